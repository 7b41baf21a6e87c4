"""Depth baselines behind the same interface as the DP: ShortGPT's Block Influence and drop-last."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..elastic import ElasticLM
from .depth_dp import DepthSearch


@torch.no_grad()
def block_influence(elastic: ElasticLM, rows: torch.Tensor, *, batch_size: int = 1) -> list[float]:
    """BI of each layer: 1 − mean cosine(input, output) over calibration tokens (ShortGPT)."""
    n = elastic.dims.num_layers
    sums, count = [0.0] * n, 0

    def observe(kind: str, layer: int, value: object) -> None:
        if kind == "block":
            x, y = value
            sums[layer] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().item()

    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start:start + batch_size]
        elastic(batch, observe=observe)
        count += batch.numel()
    return [1.0 - s / count for s in sums]


def block_influence_selection(influence: list[float], max_removed: int) -> DepthSearch:
    """Remove the layers with the lowest Block Influence first."""
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    return DepthSearch(removed={m: tuple(sorted(order[:m])) for m in range(max_removed + 1)})


def drop_last_selection(num_layers: int, max_removed: int) -> DepthSearch:
    """Remove the last m layers."""
    return DepthSearch(removed={m: tuple(range(num_layers - m, num_layers)) for m in range(max_removed + 1)})
