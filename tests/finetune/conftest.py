"""Fixtures: a tiny random Llama with a synthetic plan (random importance order, no corpus needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_plan(model_dir: Path, out: Path, seed: int = 0, compensate: str = "lstsq") -> Path:
    from amoeba_export.elastic import make_elastic
    from amoeba_export.modelio import load_model
    from amoeba_export.plan import Plan, PlanConfig
    from amoeba_export.plan.width_importance import LayerRanking
    from amoeba_export.reconstruct import LayerCovariance
    from amoeba_export.shape import ModelDims

    elastic = make_elastic(load_model(model_dir))
    dims = ModelDims.from_config(elastic.config)
    gen = torch.Generator().manual_seed(seed)
    units = dims.group_size if dims.group_size > 1 else dims.num_heads
    rankings = []
    for _ in range(dims.num_layers):
        # Random (non-identity) orders, so a slicing or permutation mistake cannot hide.
        slots = torch.randperm(units, generator=gen)
        heads = (slots[:, None] * dims.num_kv_heads + torch.arange(dims.num_kv_heads)).reshape(-1) \
            if dims.group_size > 1 else slots
        rankings.append(LayerRanking(
            head_perm=heads, mlp_perm=torch.randperm(dims.intermediate_size, generator=gen),
            attn_scores=torch.sort(torch.randn(units, generator=gen), descending=True).values,
            mlp_scores=torch.sort(torch.randn(dims.intermediate_size, generator=gen), descending=True).values,
            attn_mean=0.1 * torch.randn(dims.num_heads * dims.head_dim, generator=gen),
            mlp_mean=0.1 * torch.randn(dims.intermediate_size, generator=gen)))
    n = dims.num_layers
    table = {n: tuple(range(n)), n - 1: (0, 1, n - 1), n - 2: (0, n - 1)}

    def covariance(size: int) -> torch.Tensor:  # random, well-conditioned, for least-squares compensation
        a = torch.randn(size, 2 * size, generator=gen)
        return a @ a.T / (2 * size)

    covariances = tuple(LayerCovariance(covariance(dims.num_heads * dims.head_dim),
                                        covariance(dims.intermediate_size)) for _ in range(n))
    rows = torch.randint(0, dims.vocab_size, (4, 32), generator=gen)  # depth-map calibration rows
    plan = Plan(model_dir=str(model_dir), dims=dims, config=PlanConfig(round_to=8, compensate=compensate),
                depth_tables={"dp": table}, rankings=tuple(rankings), calibration_rows=rows,
                layer_covariances=covariances)
    return plan.save(out)


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory) -> Path:
    from amoeba_export.testing import tiny_llama

    root = tmp_path_factory.mktemp("finetune")
    tiny_llama(root / "model", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128)
    return make_plan(root / "model", root / "plan")


@pytest.fixture(scope="session")
def tiny_plan_mean(tiny_plan) -> Path:
    """The same model and plan with mean-only compensation."""
    return make_plan(tiny_plan.parent / "model", tiny_plan.parent / "plan-mean", compensate="mean")


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, especially on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
