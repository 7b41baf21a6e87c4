"""Width importance by FLAP's fluctuation metric, as AmoebaLLM uses it.

Per input channel ``c`` of ``o_proj`` and ``down_proj``: ``Var(x_c) · ||W[:, c]||²`` over calibration tokens.
Attention scores are pooled per head; with grouped-query attention the unit of width is a *slot* (one
query head in every KV group, so the layer stays a valid GQA layer), with multi-head attention a head.
Scores are standardised within each layer, so heads and channels of all layers can be ranked together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..elastic import ElasticLM


@dataclass
class ChannelStats:
    """Running per-channel sums (float64) of one projection's input."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n: int) -> ChannelStats:
        return cls(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.count - self.mean ** 2).clamp_min(0)


@dataclass
class LayerRanking:
    """One layer's width ordering: permutations (internal layout) and sorted, standardised unit scores."""

    head_perm: torch.Tensor  # permutation of internal heads, most important first (per slot/head unit)
    mlp_perm: torch.Tensor
    attn_scores: torch.Tensor  # z-scored score per attention unit (slot or head), descending
    mlp_scores: torch.Tensor  # z-scored score per MLP channel, descending
    attn_mean: torch.Tensor  # o_proj input mean per channel, in permuted order
    mlp_mean: torch.Tensor  # down_proj input mean per channel, in permuted order


@torch.no_grad()
def collect_stats(elastic: ElasticLM, rows: torch.Tensor, *, batch_size: int = 1,
                  progress: bool = True) -> tuple[list[ChannelStats], list[ChannelStats]]:
    """Input statistics of every o_proj and down_proj over calibration rows, full shape."""
    dims = elastic.dims
    attn = [ChannelStats.zeros(dims.num_heads * dims.head_dim) for _ in range(dims.num_layers)]
    mlp = [ChannelStats.zeros(dims.intermediate_size) for _ in range(dims.num_layers)]

    def observe(kind: str, layer: int, value: object) -> None:
        if kind == "attn_in":
            attn[layer].add(value)
        elif kind == "mlp_in":
            mlp[layer].add(value)

    for start in tqdm(range(0, rows.shape[0], batch_size), desc="width statistics", disable=not progress):
        elastic(rows[start:start + batch_size], observe=observe)
    return attn, mlp


def _zscore(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def rank_layer(elastic: ElasticLM, layer: int, attn: ChannelStats, mlp: ChannelStats) -> LayerRanking:
    dims = elastic.dims
    block = elastic.layers[layer]
    w_o = block.o_proj.weight.detach().double()
    w_d = block.down_proj.weight.detach().double()
    attn_channel = attn.variance * w_o.pow(2).sum(0)
    mlp_channel = mlp.variance * w_d.pow(2).sum(0)
    head = attn_channel.view(dims.num_heads, dims.head_dim).sum(1)
    n_kv, group = dims.num_kv_heads, dims.group_size
    if group > 1:
        # internal head j*n_kv + g: order the slots of each KV group independently
        per_group = head.view(group, n_kv)  # [slot, group]
        order = per_group.argsort(dim=0, descending=True)  # [slot rank, group] -> old slot
        head_perm = torch.stack([order[j] * n_kv + torch.arange(n_kv) for j in range(group)]).reshape(-1)
        unit_scores = per_group.gather(0, order).mean(1)  # mean over groups of the j-th best head
    else:
        head_perm = head.argsort(descending=True)
        unit_scores = head[head_perm]
    mlp_perm = mlp_channel.argsort(descending=True)
    ch = elastic._head_channels(head_perm)
    return LayerRanking(
        head_perm=head_perm, mlp_perm=mlp_perm,
        attn_scores=_zscore(unit_scores).float(), mlp_scores=_zscore(mlp_channel[mlp_perm]).float(),
        attn_mean=attn.mean[ch].float(), mlp_mean=mlp.mean[mlp_perm].float(),
    )
