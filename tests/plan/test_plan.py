import dataclasses
import json
import math

import pytest
import torch

from amoeba_export.errors import CheckpointError, ShapeError
from amoeba_export.plan import Plan, load_elastic
from amoeba_export.plan.config import UNBOUNDED_SPREAD
from amoeba_export.plan.plan import PLAN_VERSION


def test_plan_round_trip(tiny_plan_dir):
    plan = Plan.load(tiny_plan_dir)
    plan.save(tiny_plan_dir.parent / "copy")
    again = Plan.load(tiny_plan_dir.parent / "copy")
    assert again.depth_tables == plan.depth_tables and again.config == plan.config
    for a, b in zip(plan.rankings, again.rankings):
        assert torch.equal(a.head_perm, b.head_perm) and torch.equal(a.mlp_scores, b.mlp_scores)
    assert plan.stats["dp_evaluations"] == sum(min(n, 3) for n in range(1, 6))


def test_depth_tables_cover_every_depth(tiny_plan_dir):
    plan = Plan.load(tiny_plan_dir)
    for method, table in plan.depth_tables.items():
        assert sorted(table) == [3, 4, 5, 6], method
        for depth, layers in table.items():
            assert len(layers) == depth
    assert all(5 in layers for layers in plan.depth_table.values())  # the last layer is kept


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_widths_are_nested_and_shrink(tiny_plan_dir, mode):
    plan = Plan.load(tiny_plan_dir)
    prev = None
    for width in (1.0, 0.875, 0.75, 0.625, 0.5):
        s = plan.shape(6, width, mode)
        params = s.num_params(plan.dims)
        if prev is not None:
            assert params <= prev
        prev = params
        assert all(m % 8 == 0 for m in s.mlp)
    if mode == "uniform":
        assert plan.shape(6, 0.5, mode).uniform


def test_global_width_hits_budget(tiny_plan_dir):
    plan = Plan.load(tiny_plan_dir)
    full = plan.shape(6, 1.0)
    half = plan.shape(6, 0.5)
    emb = plan.dims.vocab_size * plan.dims.hidden_size * 2
    ratio = (half.num_params(plan.dims) - emb) / (full.num_params(plan.dims) - emb)
    assert 0.4 < ratio < 0.6


def test_importance_order_keeps_full_logits(tiny_dir, tiny_plan_dir):
    from amoeba_export.modelio import load_model

    elastic, plan = load_elastic(tiny_plan_dir, compensate=False)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(elastic(ids), load_model(tiny_dir)(ids).logits, atol=5e-5, rtol=0)


def test_bad_depth_and_width(tiny_plan_dir):
    plan = Plan.load(tiny_plan_dir)
    with pytest.raises(ShapeError, match="depth 2 is not in the plan"):
        plan.shape(2, 1.0)
    with pytest.raises(ShapeError) as err:
        plan.shape(2, 1.5, "diagonal")
    assert "width ratio" in str(err.value) and "unknown width mode" in str(err.value)


def test_shapes_for_params(tiny_plan_dir):
    plan = Plan.load(tiny_plan_dir)
    budget = int(plan.full_shape().num_params(plan.dims) * 0.8)
    shapes = plan.shapes_for_params(budget)
    assert shapes and all(plan.params_for(s) <= budget for s in shapes)
    with pytest.raises(ShapeError, match="no shape has"):
        plan.shapes_for_params(1000)


def test_corrupt_plan(tiny_plan_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_plan_dir, bad)
    (bad / "width.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Plan.load(bad)
    body = json.loads((bad / "plan.json").read_text())
    (bad / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json"):
        Plan.load(bad)
    assert body["version"] == PLAN_VERSION


def test_config_reports_every_problem_at_once():
    from amoeba_export.errors import ConfigError
    from amoeba_export.plan import PlanConfig

    with pytest.raises(ConfigError) as exc:
        PlanConfig(depth_metric="accuracy", calibration_rows="end", depth_seq_len=4).validate()
    text = str(exc.value)
    assert "depth_metric" in text and "calibration_rows" in text and "depth_seq_len" in text
    assert "supported are: perplexity, mc:<BIG-bench task>" in text


def test_plan_with_multiple_choice_depth_metric(tiny_dir, tiny_calibration, monkeypatch):
    """`mc:<task>` runs the DP on multiple-choice error; the table still covers every depth."""
    from amoeba_export.evaluation import tasks
    from amoeba_export.plan import PlanConfig, build_plan

    examples = tuple(tasks.MCExample(f"Q: item {i} is", (" red", " blue", " green"), frozenset({i % 3}))
                     for i in range(9))
    monkeypatch.setattr(tasks, "load_bigbench_task", lambda name: tasks.MCTask(name, "toy", examples))
    plan = build_plan(tiny_dir, PlanConfig(seq_len=64, width_tokens=512, depth_tokens=256, round_to=8,
                                           depth_metric="mc:toy"), progress=False, calibration=tiny_calibration)
    n = plan.dims.num_layers
    assert plan.stats["dp_metric"] == "mc:toy"
    assert all(0.0 <= v <= 1.0 for v in plan.stats["dp_calibration_loss"].values())
    assert sorted(plan.depth_table) == list(range(n - len(plan.stats["dp_calibration_loss"]) + 1, n + 1))


def _greedy_widths(plan, layers, width, r):
    """The global allocation as a plain loop, one unit at a time (the specification _global_widths vectorises):
    every kept layer starts with one attention unit and ``min(r, intermediate)`` MLP channels; each layer then
    takes its own best units while it stays within its floor ``width · (1 − spread)`` of its parameters; the
    others are taken best score first until the first that no longer fits the width budget, a layer closing at
    the first of its units that would pass its cap ``width · (1 + spread)``."""
    (attn_cost, mlp_cost), inter, units = plan.unit_costs(), plan.dims.intermediate_size, plan._units()
    spread = plan.config.global_spread
    floor = min(r, inter)
    per_layer = units * attn_cost + inter * mlp_cost
    keep = {layer: [1, floor] for layer in layers}  # [attention units, MLP channels]
    size = {layer: attn_cost + floor * mlp_cost for layer in layers}
    pool = []
    for layer in layers:
        rk = plan.rankings[layer]
        pool += [(float(s), 0, attn_cost, layer) for s in rk.attn_scores[1:]]
        pool += [(float(s), 1, mlp_cost, layer) for s in rk.mlp_scores[floor:]]
    pool = sorted(enumerate(pool), key=lambda u: -u[1][0])  # stable, like torch.sort(stable=True)
    taken = set()
    for layer in layers:
        for i, (_, kind, cost, owner) in pool:
            if owner != layer:
                continue
            if size[layer] + cost > width * (1 - spread) * per_layer:
                break
            size[layer] += cost
            keep[layer][kind] += 1
            taken.add(i)
    room = math.floor(width * len(layers) * per_layer) - sum(size.values())
    closed = set()
    for i, (_, kind, cost, layer) in pool:
        if i in taken:
            continue
        if layer in closed or size[layer] + cost > width * (1 + spread) * per_layer:
            closed.add(layer)
            continue
        if cost > room:
            break
        room -= cost
        size[layer] += cost
        keep[layer][kind] += 1
    return [(*plan._heads_for_units(keep[layer][0]), plan._round_mlp(keep[layer][1], r)) for layer in layers]


@pytest.mark.parametrize("spread", [0.0, 0.25, 1.0, UNBOUNDED_SPREAD])
@pytest.mark.parametrize("round_to", [1, 8])
def test_global_widths_match_greedy_loop(tiny_plan_dir, round_to, spread):
    plan = Plan.load(tiny_plan_dir)
    plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, global_spread=spread))
    for depth in plan.depths:
        layers = plan.depth_table[depth]
        for width in (0.05, 0.2, 0.37, 0.5, 0.61, 0.8, 0.95, 0.999):
            assert plan._global_widths(layers, width, round_to) == _greedy_widths(plan, layers, width, round_to)


def test_global_spread_bounds_every_layer(tiny_plan_dir):
    """Each layer's width parameters stay within width · (1 ± spread) of its own, up to one unit. One layer's
    scores are lifted above every other's, as FLAP's can be: unbounded, that layer takes all its units and the
    others starve; bounded, every layer stays in its band."""
    plan = Plan.load(tiny_plan_dir)
    lifted = dataclasses.replace(plan.rankings[0], attn_scores=plan.rankings[0].attn_scores + 100,
                                 mlp_scores=plan.rankings[0].mlp_scores + 100)
    plan = dataclasses.replace(plan, rankings=(lifted, *plan.rankings[1:]))
    (attn_cost, mlp_cost), units, inter = plan.unit_costs(), plan._units(), plan.dims.intermediate_size
    per_layer = units * attn_cost + inter * mlp_cost
    heads_per_unit = plan.dims.num_heads // units

    def fractions(spread, width):
        p = dataclasses.replace(plan, config=dataclasses.replace(plan.config, global_spread=spread))
        return [(q // heads_per_unit * attn_cost + m * mlp_cost) / per_layer
                for q, _, m in p._global_widths(p.depth_table[max(p.depths)], width, 1)]

    slack = max(attn_cost, mlp_cost) / per_layer
    for width in (0.37, 0.5, 0.61):
        assert all(width * 0.75 - slack <= f <= width * 1.25 + slack for f in fractions(0.25, width))
    unbounded = fractions(UNBOUNDED_SPREAD, 0.5)
    assert unbounded[0] == 1.0 > 0.5 * 1.25 + slack  # layer 0 took everything; the others shared the rest
