"""Width importance by FLAP's fluctuation metric, as AmoebaLLM uses it.

Per input channel ``c`` of ``o_proj`` and ``down_proj``: ``Var(x_c) · ||W[:, c]||²`` over calibration tokens.
As in FLAP, this *channel* metric is standardised within each layer and projection first (attention over the
``o_proj`` input channels, MLP over the ``down_proj`` input channels), and only then pooled per unit of
width: with grouped-query attention a *slot* (one query head in every KV group, so the layer stays a valid
GQA layer), with multi-head attention a head. A unit's score is the *mean* of its channels' standardised
scores (FLAP averages per head): it sits on the same per-channel scale as an MLP channel, so the global
ranking compares like with like (a channel of a slot and an MLP channel cost 2·hidden vs 3·hidden
parameters). Standardising the pooled unit scores instead — three slots per layer on SmolLM2 — would give
every layer ≈ {−1, 0, +1} however far apart its heads really are.

The same pass can gather each projection's input covariance for least-squares width reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..elastic import ElasticLM
from ..reconstruct import LayerCovariance
from .width_order import refit_order


@dataclass
class ChannelStats:
    """Running per-channel sums (float64) of one projection's input, and optionally its Gram matrix."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0
    # float32 Σ (x − shift)(x − shift)ᵀ. Shifting by the first batch's mean keeps the covariance's small
    # directions: the raw XᵀX/n − μμᵀ would cancel catastrophically in float32 for channels with a large mean.
    gram: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    @classmethod
    def zeros(cls, n: int, *, gram: bool = False) -> ChannelStats:
        return cls(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                   gram=torch.zeros(n, n) if gram else None)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        xd = x.double()
        self.total += xd.sum(0)
        self.squares += (xd * xd).sum(0)
        self.count += x.shape[0]
        if self.gram is not None:
            if self.shift is None:
                self.shift = x.float().mean(0)
            centred = x.float() - self.shift
            self.gram.addmm_(centred.T, centred)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.count - self.mean ** 2).clamp_min(0)

    def covariance(self) -> torch.Tensor:
        """Population covariance (float64) from the shifted Gram matrix."""
        if self.gram is None or self.shift is None:
            raise ValueError("these statistics were gathered without a Gram matrix")
        d = self.mean - self.shift.double()
        return self.gram.double() / self.count - torch.outer(d, d)


@dataclass
class LayerRanking:
    """One layer's width ordering: permutations (internal layout) and sorted, standardised unit scores."""

    head_perm: torch.Tensor  # permutation of internal heads, most important first (per slot/head unit)
    mlp_perm: torch.Tensor
    attn_scores: torch.Tensor  # per attention unit: mean standardised channel score, descending
    mlp_scores: torch.Tensor  # per MLP position: standardised FLAP scores, descending (see rank_layer's order)
    attn_mean: torch.Tensor  # o_proj input mean per channel, in permuted order
    mlp_mean: torch.Tensor  # down_proj input mean per channel, in permuted order


@torch.no_grad()
def collect_stats(elastic: ElasticLM, rows: torch.Tensor, *, batch_size: int = 1, gram: bool = False,
                  progress: bool = True) -> tuple[list[ChannelStats], list[ChannelStats]]:
    """Input statistics of every o_proj and down_proj over calibration rows, full shape (``gram``: with the
    input covariance, for least-squares reconstruction)."""
    dims = elastic.dims
    attn = [ChannelStats.zeros(dims.num_heads * dims.head_dim, gram=gram) for _ in range(dims.num_layers)]
    mlp = [ChannelStats.zeros(dims.intermediate_size, gram=gram) for _ in range(dims.num_layers)]

    def observe(kind: str, layer: int, value: object) -> None:
        if kind == "attn_in":
            attn[layer].add(value)
        elif kind == "mlp_in":
            mlp[layer].add(value)

    for start in tqdm(range(0, rows.shape[0], batch_size), desc="width statistics", disable=not progress):
        elastic(rows[start:start + batch_size], observe=observe)
    return attn, mlp


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x − mean) / std`` over all entries (zeros when they are all equal)."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def rank_layer(elastic: ElasticLM, layer: int, attn: ChannelStats, mlp: ChannelStats, *, order: str = "flap",
               ridge: float = 0.0) -> LayerRanking:
    """One layer's ranking. ``order="refit"``: MLP channels in greedy least-squares elimination order (see
    ``width_order``; needs ``mlp``'s Gram matrix), the scores still FLAP's, sorted — they tell the global
    allocation how much a layer's k-th channel is worth; the order says which channel that is."""
    dims = elastic.dims
    block = elastic.layers[layer]
    w_o = block.o_proj.weight.detach().double()
    w_d = block.down_proj.weight.detach().double()
    attn_channel = standardise(attn.variance * w_o.pow(2).sum(0))
    mlp_channel = standardise(mlp.variance * w_d.pow(2).sum(0))
    head = attn_channel.view(dims.num_heads, dims.head_dim).mean(1)
    n_kv, group = dims.num_kv_heads, dims.group_size
    if group > 1:
        # internal head j*n_kv + g: order the slots of each KV group independently
        per_group = head.view(group, n_kv)  # [slot, group]
        slots = per_group.argsort(dim=0, descending=True)  # [slot rank, group] -> old slot
        head_perm = torch.stack([slots[j] * n_kv + torch.arange(n_kv) for j in range(group)]).reshape(-1)
        unit_scores = per_group.gather(0, slots).mean(1)  # the j-th best head of every group, averaged
    else:
        head_perm = head.argsort(descending=True)
        unit_scores = head[head_perm]
    mlp_scores = mlp_channel.sort(descending=True).values
    if order == "refit":
        mlp_perm = refit_order(w_d, mlp.covariance(), ridge=ridge)
    else:
        mlp_perm = mlp_channel.argsort(descending=True)
    ch = elastic._head_channels(head_perm)
    return LayerRanking(
        head_perm=head_perm, mlp_perm=mlp_perm,
        attn_scores=unit_scores.float(), mlp_scores=mlp_scores.float(),
        attn_mean=attn.mean[ch].float(), mlp_mean=mlp.mean[mlp_perm].float(),
    )


def layer_covariance(elastic: ElasticLM, ranking: LayerRanking, attn: ChannelStats,
                     mlp: ChannelStats) -> LayerCovariance:
    """The layer's input covariances, permuted into the ranking's importance order (float32)."""
    ch = elastic._head_channels(ranking.head_perm)
    mp = ranking.mlp_perm
    return LayerCovariance(attn=attn.covariance()[ch][:, ch].float(), mlp=mlp.covariance()[mp][:, mp].float())
