"""Width scores are standardised per channel within a layer (FLAP), then pooled per attention unit."""

import torch

from amoeba_export.elastic import make_elastic
from amoeba_export.plan.width_importance import ChannelStats, rank_layer
from amoeba_export.testing import tiny_llama


def _stats(variance: torch.Tensor) -> ChannelStats:
    n = variance.numel()
    return ChannelStats(torch.zeros(n, dtype=torch.float64), variance.double(), count=1)


def test_indistinguishable_heads_score_near_zero_and_a_dominant_head_stands_out():
    """The old ranking z-scored the 3 pooled slot scores of a layer: ≈ {−1, 0, +1} for every layer, whether
    its slots differ by noise or by orders of magnitude. Channel-level standardisation keeps the difference."""
    elastic = make_elastic(tiny_llama(layers=2, heads=6, kv_heads=2, hidden=96, intermediate=128))
    for block in elastic.layers:  # unit column norms: the metric is the input variance
        block.o_proj.weight.data.fill_(1.0)
        block.down_proj.weight.data.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    n_attn = 6 * 16
    mlp = _stats(1 + torch.rand(128, generator=g))
    flat = rank_layer(elastic, 0, _stats(1 + 0.1 * torch.rand(n_attn, generator=g)), mlp)
    dominant_var = 1 + 0.1 * torch.rand(n_attn, generator=g)
    dominant_var.view(3, 2, 16)[0] *= 100  # slot 0 (both KV groups) carries nearly all the variance
    dominant = rank_layer(elastic, 1, _stats(dominant_var), mlp)
    assert flat.attn_scores.abs().max() < 0.5
    assert dominant.attn_scores[0] > 1.0 > 0 > dominant.attn_scores[1]
    assert dominant.head_perm[:2].tolist() == [0, 1]
    assert not torch.allclose(flat.attn_scores, dominant.attn_scores, atol=0.3)
