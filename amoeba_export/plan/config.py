"""How a plan is computed (:class:`PlanConfig`) and the names it offers, torch-free.

The CLI builds ``amoeba plan --help`` from these defaults; keeping them apart from ``plan.py`` (which loads torch)
keeps that under a tenth of a second.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..reconstruct.modes import COMPENSATE_MODES, DEFAULT_DEPTH_RIDGE, DEFAULT_RIDGE

# 2: channel-level standardisation of the width scores (FLAP), input covariances, calibration rows
PLAN_VERSION = 2
DEPTH_METHODS = ("dp", "block_influence", "drop_last")
WIDTH_MODES = ("global", "uniform")
WIDTH_ORDERS = ("refit", "flap")


# A global_spread no width ratio in the plan's range (≥ 0.05) can reach: 0.05 · (1 + 100) > 1.
UNBOUNDED_SPREAD = 100.0


@dataclass(frozen=True)
class PlanConfig:
    """How a plan is computed. Defaults fit ≤ 10 min for SmolLM2-135M on a 2-core CPU."""

    seq_len: int = 512
    # Calibration tokens for the importance statistics and input covariances, in rows of seq_len spread over the
    # split; the same rows feed the depth maps. Least-squares fits of 1,536-wide inputs need many: on SmolLM2-135M
    # width 0.5 (uniform, lstsq) reaches perplexity 190 with 4,096 tokens and 105 with 16,384 (≈ +60 s of plan).
    width_tokens: int = 16384
    # Calibration tokens per DP evaluation, in rows of depth_seq_len spread over the split: 512 tokens as 4
    # rows of 128 keep 330 evaluations of SmolLM2-135M within ≈ 6 min on 2 cores, and more, shorter rows
    # from more documents judge a layer set better than one long row from one document.
    depth_tokens: int = 512
    depth_seq_len: int = 128
    # "perplexity" (calibration loss) or "mc:<BIG-bench task>" (multiple-choice error on that task)
    depth_metric: str = "perplexity"
    # "spread": rows at evenly spaced offsets over the calibration split; "start": its first tokens
    calibration_rows: str = "spread"
    max_removed: float = 0.5  # most layers the depth table removes, as a fraction of all layers
    keep_last: bool = True
    width_ratios: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)
    round_to: int = 32  # MLP widths are multiples of this (quantizer block sizes prefer 32/256)
    # Which MLP channels a narrowed layer keeps: "refit" (greedy least-squares elimination on the input covariance,
    # the channels the extraction's refit reconstructs best from; plan/width_order.py) or "flap" (FLAP's
    # fluctuation metric alone). SmolLM2-135M with the refit, held-out perplexity: width 0.5 uniform 104.9 → 102.8,
    # global 139.1 → 137.2; 0.75 global 46.5 → 45.5 (README); ≈ 1 min of plan time on 2 cores. Plans written
    # before this field: "flap".
    width_order: str = "refit"
    # Global width mode keeps each layer's width parameters within width · (1 ± global_spread) of its share, as
    # OWL bounds its per-layer sparsities: FLAP's standardised scores say which units of a layer matter, not
    # how much a whole layer can lose, and unbounded they starve some layers (SmolLM2-135M, width 0.5 with
    # least-squares refit: 205 held-out perplexity unbounded vs 105 uniform). Chosen on calibration text
    # (README); ≥ 1/width − 1 lifts the bound. Plans written before this field keep their unbounded allocation.
    global_spread: float = 0.25
    # Extraction defaults. compensate: "lstsq" (refit kept o_proj/down_proj columns + bias by least squares),
    # "mean" (FLAP: removed channels' mean contribution as a bias) or "none".
    compensate: str = "lstsq"
    width_ridge: float = DEFAULT_RIDGE
    # Depth maps (ReplaceMe) fitted at extraction on up to this many of the width calibration tokens: one pass of
    # the full model and the subnet. More tokens fit better (SmolLM2-135M, 8 of 30 layers removed: held-out
    # perplexity 79.7 / 64.6 / 58.1 / 54.8 with 2,048 / 4,096 / 8,192 / 16,384) and cost linearly more time.
    depth_maps: bool = True
    depth_map_tokens: int = 8192
    depth_ridge: float = DEFAULT_DEPTH_RIDGE
    version: int = PLAN_VERSION

    def type_problems(self) -> list[str]:
        """Fields whose value is not of their default's type (a plan.json edited or damaged by hand)."""
        out = []
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), type(f.default)
            if want is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            elif want is tuple:
                ok = isinstance(value, tuple) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                      for x in value)
            else:
                ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            if not ok:
                out.append(f"{f.name} must be a {want.__name__}, got {value!r}")
        return out

    def problems(self) -> list[str]:
        if typed := self.type_problems():
            return typed  # the range checks below assume the types
        out = []
        if self.seq_len < 8:
            out.append("seq_len must be ≥ 8")
        if self.width_tokens < self.seq_len:
            out.append("width_tokens must be ≥ seq_len")
        if self.depth_seq_len < 8 or self.depth_tokens < self.depth_seq_len:
            out.append("depth_seq_len must be ≥ 8 and depth_tokens ≥ depth_seq_len")
        mc_task = self.depth_metric.removeprefix("mc:") if self.depth_metric.startswith("mc:") else ""
        if self.depth_metric != "perplexity" and not mc_task:
            out.append(f"depth_metric {self.depth_metric!r}: supported are: perplexity, mc:<BIG-bench task>")
        if self.calibration_rows not in ("spread", "start"):
            out.append(f"calibration_rows {self.calibration_rows!r}: supported are: spread, start")
        if not 0 <= self.max_removed < 1:
            out.append("max_removed must be in [0, 1)")
        if not self.width_ratios or any(not 0 < w <= 1 for w in self.width_ratios):
            out.append("width_ratios must be in (0, 1]")
        if self.round_to < 1:
            out.append("round_to must be ≥ 1")
        if self.width_order not in WIDTH_ORDERS:
            out.append(f"width_order {self.width_order!r}: supported are: {', '.join(WIDTH_ORDERS)}")
        if self.global_spread < 0:
            out.append("global_spread must be ≥ 0")
        if self.compensate not in COMPENSATE_MODES:
            out.append(f"compensate {self.compensate!r}: supported are: {', '.join(COMPENSATE_MODES)}")
        if self.width_ridge < 0 or self.depth_ridge < 0:
            out.append("width_ridge and depth_ridge must be ≥ 0")
        if self.depth_map_tokens < self.seq_len:
            out.append("depth_map_tokens must be ≥ seq_len")
        return out

    def validate(self) -> PlanConfig:
        if problems := self.problems():
            raise ConfigError("plan config", problems, fix="fix the listed values")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanConfig:
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise CheckpointError(f"plan version {d.get('version')} is not supported", fix="re-run amoeba plan")
        known = {f for f in cls.__dataclass_fields__}
        # plans written before these fields existed ran the DP on the split's first tokens, at seq_len
        # and allocated global widths with no per-layer bound
        d = {"calibration_rows": "start", "depth_seq_len": d.get("seq_len", 512),
             "global_spread": UNBOUNDED_SPREAD, "width_order": "flap"} | d
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)
