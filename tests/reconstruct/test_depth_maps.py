"""Depth maps: identity on an empty run, mergeable into down_proj, and skipped where nothing precedes them."""

import torch

from amoeba_export.elastic import make_elastic
from amoeba_export.reconstruct import fit_depth_maps, fit_linear_map, removed_runs
from amoeba_export.shape import Shape
from amoeba_export.testing import tiny_llama

IDS = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(5))


def _elastic():
    return make_elastic(tiny_llama(layers=5, heads=6, kv_heads=2, hidden=96, intermediate=128))


def test_removed_runs():
    assert removed_runs((1, 2, 5), 7) == [(0, 0), (3, 4), (6, 6)]
    assert removed_runs((0, 1, 2), 3) == []


@torch.no_grad()
def test_map_over_a_run_of_zero_layers_is_the_identity():
    """Fitting the kept layer's own output (nothing removed after it) gives T = I."""
    elastic = _elastic()
    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(6))  # 512 tokens > 96 dims
    h, pos = elastic.embed(ids)
    width = elastic.widths(elastic.full_shape())[1]
    residual, mlp_out = elastic.layers[1].sublayers(h, pos, width)
    t = fit_linear_map(mlp_out, (residual + mlp_out) - residual, ridge=0.0)
    torch.testing.assert_close(t, torch.eye(t.shape[0]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_merged_map_equals_applying_it():
    elastic = _elastic()
    shape = Shape((0, 1, 4), (6, 6, 6), (2, 2, 2), (128, 128, 128))
    maps = fit_depth_maps(elastic, shape, IDS)
    assert sorted(maps.maps) == [1] and maps.skipped == ()
    explicit = elastic.head(elastic.run_layers(*elastic.embed(IDS), elastic.widths(shape), shape.layers, maps=maps))
    down = elastic.layers[1].down_proj
    down.weight.data = maps.maps[1] @ down.weight.data
    merged = elastic(IDS, shape)
    torch.testing.assert_close(merged, explicit, atol=1e-5, rtol=0)


@torch.no_grad()
def test_map_brings_the_subnet_closer_to_the_full_model():
    elastic = _elastic()
    shape = Shape((0, 1, 4), (6, 6, 6), (2, 2, 2), (128, 128, 128))
    full = elastic(IDS)
    plain = elastic(IDS, shape)
    maps = fit_depth_maps(elastic, shape, IDS)
    h, pos = elastic.embed(IDS)
    mapped = elastic.head(elastic.run_layers(h, pos, elastic.widths(shape), shape.layers, maps=maps))
    assert (mapped - full).pow(2).mean() < (plain - full).pow(2).mean()


def test_run_from_layer_zero_is_skipped():
    elastic = _elastic()
    maps = fit_depth_maps(elastic, Shape((2, 3, 4), (6,) * 3, (2,) * 3, (128,) * 3), IDS)
    assert maps.maps == {} and maps.skipped == ((0, 1),)


@torch.no_grad()
def test_first_map_of_a_depth_cut_is_replaceme():
    """On a pure depth cut the first map's target is the full model's hidden state after the run minus the
    preceding layer's residual (ReplaceMe's least-squares construction)."""
    elastic = _elastic()
    shape = Shape((0, 1, 2, 4), (6,) * 4, (2,) * 4, (128,) * 4)
    maps = fit_depth_maps(elastic, shape, IDS, ridge=1e-3)
    full = elastic.widths(elastic.full_shape())
    h, pos = elastic.embed(IDS)
    for layer in range(4):
        h = elastic.layers[layer](h, pos, full[layer])
    target = h
    h, _ = elastic.embed(IDS)
    for layer in (0, 1):
        h = elastic.layers[layer](h, pos, full[layer])
    residual, mlp_out = elastic.layers[2].sublayers(h, pos, full[2])
    torch.testing.assert_close(maps.maps[2], fit_linear_map(mlp_out, target - residual, ridge=1e-3))


@torch.no_grad()
def test_bfloat16_pass_fits_the_float32_maps_closely_and_says_so():
    """The calibration pass in bfloat16 (what ``auto`` picks where it is faster) changes the maps by the order
    of bfloat16 rounding, far below their own size; the precision used is recorded."""
    elastic = _elastic()
    shape = Shape((0, 1, 4), (6, 6, 6), (2, 2, 2), (128, 128, 128))
    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(7))
    exact = fit_depth_maps(elastic, shape, ids, ridge=1e-3)
    fast = fit_depth_maps(elastic, shape, ids, ridge=1e-3, precision="bfloat16")
    assert (exact.precision, fast.precision) == ("float32", "bfloat16")
    assert fast.describe()["fit_precision"] == "bfloat16"
    rel = (fast.maps[1] - exact.maps[1]).norm() / exact.maps[1].norm()
    assert 0 < rel < 0.1, rel
