"""Fine-tuning configs: frozen, versioned, JSON-serialisable, validated up front (every problem at once)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CONFIG_VERSION = 1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("constant", "cosine", "linear")
DATA_FORMATS = ("auto", "text", "alpaca")
DEFAULT_WIDTH_RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5)
# Quantization-aware training: ExecuTorch recipe names (backends/executorch/recipes.py) whose decoder linears
# the fine-tune fake-quantizes as that recipe exports them (amoeba_export/finetune/qat.py). A name here must be
# a recipe whose decoder linears are 8da4w/8da8w (tests/finetune/test_qat.py checks it).
QAT_SCHEMES = ("8da4w", "8da4w-attn", "8da8w")
# How QAT picks the int4 groups' scales: "absmax" (torchao's QAT: max|w| / 7.5, gradients through it) or "hqq"
# (the recipe's own HQQ scale-only scales, fixed per forward: the QAT forward is then the exported linear's).
QAT_SCALES = ("absmax", "hqq")
# What the quantized shapes learn from under QAT: "base" (default: every shape, the largest included, distilled from
# the frozen base model's full-precision logits — what the quantized subnets should reproduce) or "labels" (the
# largest shape's cross-entropy on the text, the others distilled from the largest's quantized logits, as without
# QAT). Measured side by side (bench/qat_gain.py, SmolLM2-135M, 20 steps; 8da4w perplexity, plain / labels / base):
# full shape 30.77 / 29.40 / 28.87, ≈ 50 % shape 405.0 / 438.6 / 367.7 (seed 1: 29.57 / 27.88 / 28.04 and 378.8 /
# 378.5 / 385.2 — base wins on average over the two seeds, not on each). The adapted weights' own unquantized forward
# as teacher (tried, not shipped) gave 30.74 / 505.7: its perplexity ratio looked best only because the adapters
# pulled the fp32 model toward its quantized self (full-shape fp32 23.6 → 27.7).
QAT_TEACHERS = ("base", "labels")


def qat_problems(scheme: str | None, scales: str, teacher: str = QAT_TEACHERS[0]) -> list[str]:
    """What is wrong with quantization-aware training settings (``scheme`` None: QAT off)."""
    out = []
    if teacher not in QAT_TEACHERS:
        out.append(f"qat_teacher {teacher!r} is not a QAT teacher (supported are: {', '.join(QAT_TEACHERS)})")
    elif scheme is None and teacher != QAT_TEACHERS[0]:  # "labels" without QAT is just the plain fine-tune
        out.append(f"qat_teacher {teacher!r} needs a qat scheme (supported are: {', '.join(QAT_SCHEMES)})")
    if scheme is not None and scheme not in QAT_SCHEMES:
        out.append(f"qat {scheme!r} is not a quantization-aware training scheme "
                   f"(supported are: {', '.join(QAT_SCHEMES)})")
    if scales not in QAT_SCALES:
        out.append(f"qat_scales {scales!r} is not a QAT scale choice (supported are: {', '.join(QAT_SCALES)})")
    elif scheme is None and scales != QAT_SCALES[0]:
        out.append(f"qat_scales {scales!r} needs a qat scheme (supported are: {', '.join(QAT_SCHEMES)})")
    return out


@dataclass(frozen=True)
class SMoLConfig:
    """Shape-aware mixture of LoRAs: ``experts`` LoRAs of rank ``rank`` on every ``targets`` linear, mixed by
    one gate shared by all layers. ``experts=1`` is plain single-LoRA (no gate)."""

    experts: int = 5
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    gate_hidden: int = 16
    noisy_gate: bool = True
    targets: tuple[str, ...] = PROJECTIONS
    # The offered width choices; a shape's width is encoded as the one-hot of the nearest ratio.
    width_ratios: tuple[float, ...] = DEFAULT_WIDTH_RATIOS
    version: int = CONFIG_VERSION

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.version != CONFIG_VERSION:
            out.append(f"smol.version {self.version} is not supported (this is {CONFIG_VERSION})")
        if self.experts < 1:
            out.append(f"smol.experts must be >= 1, got {self.experts}")
        if self.rank < 1:
            out.append(f"smol.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            out.append(f"smol.alpha must be > 0, got {self.alpha}")
        if not 1 <= self.top_k <= max(self.experts, 1):
            out.append(f"smol.top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.gate_hidden < 1:
            out.append(f"smol.gate_hidden must be >= 1, got {self.gate_hidden}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            out.append(f"smol.targets must be a non-empty subset of {', '.join(PROJECTIONS)} (lm_head is never "
                       f"adapted); got {list(self.targets)}")
        if not self.width_ratios or any(not 0 < r <= 1 for r in self.width_ratios):
            out.append(f"smol.width_ratios must be non-empty ratios in (0, 1], got {list(self.width_ratios)}")
        return out


@dataclass(frozen=True)
class TrainConfig:
    """One elastic fine-tune. ``batch_size`` is per process; the global batch is ``batch_size × processes``."""

    steps: int = 1000
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 1
    seq_len: int = 256
    shapes_per_step: int = 4
    temperature: float = 1.0
    balance: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    mixed_precision: str = "no"
    width_mode: str = "global"
    data_format: str = "auto"
    data_files: tuple[str, ...] = ()  # empty: the shipped train split
    max_train_tokens: int | None = None
    gradient_checkpointing: bool = False
    # None, or one of QAT_SCHEMES: fake-quantize every decoder linear that recipe quantizes (finetune/qat.py),
    # with int4 scales chosen as qat_scales says (one of QAT_SCALES).
    qat: str | None = None
    qat_scales: str = "absmax"
    qat_teacher: str = QAT_TEACHERS[0]  # one of QAT_TEACHERS (configs from before it: "labels", see from_dict)
    smol: SMoLConfig = field(default_factory=SMoLConfig)
    version: int = CONFIG_VERSION

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.version != CONFIG_VERSION:
            out.append(f"version {self.version} is not supported (this is {CONFIG_VERSION})")
        for name in ("steps", "batch_size", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            out.append(f"seq_len must be >= 2, got {self.seq_len}")
        if self.lr <= 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            out.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            out.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.shapes_per_step < 2:
            out.append(f"shapes_per_step must be >= 2 (largest + smallest), got {self.shapes_per_step}")
        if self.temperature <= 0:
            out.append(f"temperature must be > 0, got {self.temperature}")
        if self.max_grad_norm < 0:
            out.append(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        if self.mixed_precision not in MIXED_PRECISION:
            out.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.width_mode not in ("global", "uniform"):
            out.append(f"width_mode must be 'global' or 'uniform', got {self.width_mode!r}")
        if self.data_format not in DATA_FORMATS:
            out.append(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.max_train_tokens is not None and self.max_train_tokens < self.seq_len:
            out.append(f"max_train_tokens must be >= seq_len ({self.seq_len}), got {self.max_train_tokens}")
        out.extend(qat_problems(self.qat, self.qat_scales, self.qat_teacher))
        out.extend(self.smol.problems())
        return out

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training config", problems, fix="correct the listed fields")
        return self

    # -- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_files"] = list(self.data_files)
        d["smol"]["targets"] = list(self.smol.targets)
        d["smol"]["width_ratios"] = list(self.smol.width_ratios)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        problems: list[str] = []
        smol_d = dict(d.get("smol") or {})
        smol_names = {f.name for f in fields(SMoLConfig)}
        names = {f.name for f in fields(cls)}
        problems += [f"unknown field smol.{k}" for k in smol_d if k not in smol_names]
        problems += [f"unknown field {k}" for k in d if k not in names]
        if problems:
            raise ConfigError("invalid training config", problems, fix="remove or rename the listed fields")
        for key in ("targets", "width_ratios"):
            if key in smol_d:
                smol_d[key] = tuple(smol_d[key])
        top = {k: v for k, v in d.items() if k != "smol"}
        if top.get("qat") is not None and "qat_teacher" not in top:
            top["qat_teacher"] = "labels"  # a QAT run from before the field trained on labels: resumes as it ran
        if "data_files" in top:
            top["data_files"] = tuple(top["data_files"])
        try:
            return cls(**top, smol=SMoLConfig(**smol_d))
        except TypeError as exc:
            raise ConfigError("invalid training config", [str(exc)], fix="check the field types") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read training config {path}", [str(exc)], fix="pass a JSON file") from exc
        return cls.from_dict(data)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        smol_changes = {k[len("smol_"):]: v for k, v in changes.items() if k.startswith("smol_")}
        if "experts" in smol_changes and "top_k" not in smol_changes:
            # fewer experts than the default top-k (the E=1 ablation) means routing to all of them
            smol_changes["top_k"] = min(self.smol.top_k, smol_changes["experts"])
        top = {k: v for k, v in changes.items() if not k.startswith("smol_")}
        smol = replace(self.smol, **smol_changes) if smol_changes else self.smol
        return replace(self, **top, smol=smol)


# Fields that may change when a run is resumed (they do not alter the trajectory up to the checkpoint).
RESUMABLE_CHANGES = ("steps", "save_every", "keep_checkpoints", "log_every")


def resume_problems(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Why ``new`` cannot continue a run trained with ``saved`` (empty when it can)."""
    a, b = saved.to_dict(), new.to_dict()
    out = [f"{k}: checkpoint has {a[k]!r}, requested {b[k]!r}"
           for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k] and k != "smol"]
    out += [f"smol.{k}: checkpoint has {a['smol'][k]!r}, requested {b['smol'][k]!r}"
            for k in a["smol"] if a["smol"][k] != b["smol"][k]]
    if saved.steps != new.steps and saved.scheduler != "constant":
        out.append(f"steps: a {saved.scheduler} schedule depends on the step count ({saved.steps} vs {new.steps})")
    return out
