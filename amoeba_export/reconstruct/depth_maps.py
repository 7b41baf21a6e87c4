"""Depth reconstruction (ReplaceMe): one linear map per run of removed layers, merged into ``down_proj``.

For a maximal run of removed layers ``a..b`` the kept layer ``p = a − 1`` before it computes
``out = r + m`` (``r``: its residual stream after attention, ``m``: its MLP's output). The map ``T`` makes
``r + T m`` stand in for what layers ``a..b`` would have made of ``out``::

    T = argmin_T  Σ_tokens ||T m − (F_{a..b}(r + m) − r)||²  +  λ ||T||²

fit in closed form (float64) on calibration tokens, with ``m`` and ``r`` taken from the *pruned* model (its
width refits and earlier maps already applied) and ``F_{a..b}`` the removed layers at full width. On a pure depth
cut the first run's target is exactly ReplaceMe's (the full model's hidden state after the run, minus the
residual); later runs and narrowed subnets target the removed block's effect on the subnet's own stream. ``T`` is
linear, so it merges into the preceding layer: ``down_proj.weight ← T W``, ``down_proj.bias ← T b`` — the
model stays a stock architecture with no extra tensors.

A run that starts at layer 0 has no preceding layer. Folding its map into the embedding would change the
token embedding matrix, which most small models tie to ``lm_head`` (SmolLM2 does), so the map could not be
merged without untying them and adding a vocab × hidden matrix; such a run is left unreconstructed and
reported in ``DepthMaps.skipped``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..precision import compute_in, resolve
from .modes import DEFAULT_DEPTH_RIDGE  # torch-free home, so the CLI's --help reads it

if TYPE_CHECKING:
    from ..elastic import ElasticLM
    from ..shape import Shape


@dataclass(frozen=True)
class DepthMaps:
    """Fitted maps of one shape: kept layer (original index) → ``T`` [hidden, hidden] on its MLP output."""

    maps: dict[int, torch.Tensor]
    skipped: tuple[tuple[int, int], ...] = ()  # removed runs (first, last) with no preceding layer
    tokens: int = 0
    seconds: float = 0.0
    precision: str = "float32"  # the calibration pass's matmuls (its statistics are float64 either way)

    def describe(self) -> dict[str, object]:
        return {"depth_maps": sorted(self.maps), "skipped_runs": [list(r) for r in self.skipped],
                "calibration_tokens": self.tokens, "fit_seconds": round(self.seconds, 3),
                "fit_precision": self.precision}


def removed_runs(layers: tuple[int, ...], num_layers: int) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of layer indices not in ``layers``."""
    kept, runs, start = set(layers), [], None
    for i in range(num_layers + 1):
        if i < num_layers and i not in kept:
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def fit_linear_map(inputs: torch.Tensor, targets: torch.Tensor, *, ridge: float = DEFAULT_DEPTH_RIDGE,
                   ) -> torch.Tensor:
    """``T`` minimising ``||inputs Tᵀ − targets||² + λ||T||²`` (rows are tokens), solved in float64."""
    a = inputs.reshape(-1, inputs.shape[-1]).double()
    b = targets.reshape(-1, targets.shape[-1]).double()
    gram = a.T @ a
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    t_transposed = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ b)
    return t_transposed.T.float().contiguous()


@torch.no_grad()
def fit_depth_maps(elastic: ElasticLM, shape: Shape, rows: torch.Tensor, *,
                   ridge: float = DEFAULT_DEPTH_RIDGE, precision: str = "float32") -> DepthMaps:
    """One calibration pass of the subnet, fitting the maps in order (each later map sees the earlier ones).

    ``precision``: the pass's matmuls (see :mod:`amoeba_export.precision`; ``auto`` takes bfloat16 where it is
    faster). The maps themselves are solved in float64 and returned in float32."""
    start = time.perf_counter()
    dtype = resolve(precision, rows.device)
    with compute_in(dtype, rows.device):
        maps, skipped = _fit_in_order(elastic, shape, rows, ridge)
    return DepthMaps(maps, skipped, tokens=int(rows.numel()) if maps else 0,
                     seconds=time.perf_counter() - start if maps else 0.0, precision=str(dtype).removeprefix("torch."))


def _fit_in_order(elastic: ElasticLM, shape: Shape, rows: torch.Tensor, ridge: float,
                  ) -> tuple[dict[int, torch.Tensor], tuple[tuple[int, int], ...]]:
    n = elastic.dims.num_layers
    runs = removed_runs(shape.layers, n)
    fitted = [r for r in runs if r[0] > 0]
    skipped = tuple(r for r in runs if r[0] == 0)
    if not fitted:
        return {}, skipped
    run_after = {first - 1: (first, last) for first, last in fitted}  # preceding kept layer → its removed run
    full = elastic.widths(elastic.full_shape())
    widths = elastic.widths(shape)
    maps: dict[int, torch.Tensor] = {}
    h, pos = elastic.embed(rows)
    for layer in shape.layers:
        if layer > max(run_after):
            break
        residual, mlp_out = elastic.layers[layer].sublayers(h, pos, widths[layer])
        if layer in run_after:
            # Target: what the removed layers (full width) would make of the subnet's own stream. Not the full
            # model's hidden state: once earlier layers are narrowed the subnet's stream differs from the full
            # model's, and asking one MLP output to also undo that prefix error over-fits (SmolLM2-135M,
            # d27-w0.385-uniform: held-out perplexity 363 without maps, 2,003 with full-model targets).
            first, last = run_after[layer]
            target = residual + mlp_out
            for removed in range(first, last + 1):
                target = elastic.layers[removed](target, pos, full[removed])
            maps[layer] = fit_linear_map(mlp_out, target - residual, ridge=ridge)
            mlp_out = torch.nn.functional.linear(mlp_out, maps[layer].to(mlp_out.dtype))
        h = residual + mlp_out
    return maps, skipped


@dataclass
class DepthReconstruction:
    """Fits (and keeps the latest few) depth maps per shape from a fixed set of calibration rows.

    Maps are cached by shape: the elastic model's weights must not change while this is attached (training
    runs with depth reconstruction off; a trained checkpoint's shape-specific LoRA mix is fixed per shape)."""

    rows: torch.Tensor  # [n, seq] calibration token ids
    ridge: float = DEFAULT_DEPTH_RIDGE
    precision: str = "auto"  # the calibration pass's matmuls: amoeba_export.precision.PRECISIONS
    keep: int = 8
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, init=False)

    def maps_for(self, elastic: ElasticLM, shape: Shape) -> DepthMaps:
        key = (shape.layers, shape.q_heads, shape.kv_heads, shape.mlp)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        maps = fit_depth_maps(elastic, shape, self.rows, ridge=self.ridge, precision=self.precision)
        self._cache[key] = maps
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return maps
