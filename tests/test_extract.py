import subprocess
import sys
import textwrap

import pytest
import torch

from amoeba_export.artifacts import atomic_dir, read_meta
from amoeba_export.errors import OutputExistsError
from amoeba_export.extract import extract_subnet
from amoeba_export.plan import load_elastic

IDS = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(7))

# Runs in a fresh interpreter where importing amoeba_export fails: the folder must load on its own.
NO_AMOEBA = textwrap.dedent("""
    import sys, torch, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "amoeba_export":
                raise ImportError("amoeba_export is blocked in this check")
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=True)
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(m(ids).logits, sys.argv[3])
    print(type(m).__name__)
""")


@pytest.mark.parametrize("mode,width,compensate,stock", [
    ("uniform", 0.5, False, True),
    ("uniform", 0.75, True, True),
    ("global", 0.6, False, False),
    ("global", 0.5, True, False),
])
def test_extracted_equals_elastic_subnet(tiny_plan_dir, tmp_path, mode, width, compensate, stock):
    elastic, plan = load_elastic(tiny_plan_dir, compensate=compensate)
    shape = plan.shape(4, width, mode)
    out = extract_subnet(tiny_plan_dir, tmp_path / "sub", depth=4, width=width, mode=mode, compensate=compensate)
    meta = read_meta(out)
    assert meta["stock"] is stock and meta["shape"]["layers"] == list(shape.layers)
    rec = meta["reconstruction"]  # least-squares width refit (the default) and depth maps were both applied
    assert rec["width"] == ("lstsq" if compensate else "none") and (rec["depth_maps"] or rec["skipped_runs"])
    assert meta["total_seconds"] >= meta["extract_seconds"] > 0  # the whole call, loading included
    torch.save(IDS, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", NO_AMOEBA, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("LlamaForCausalLM" if stock else "AmoebaLlamaForCausalLM")
    with torch.no_grad():
        ref = elastic(IDS, shape)
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert meta["params"] == shape.num_params(plan.dims, bias=False) or compensate


def test_full_shape_extraction_is_the_original_model(tiny_dir, tiny_plan_dir, tmp_path):
    from amoeba_export.modelio import load_model

    out = extract_subnet(tiny_plan_dir, tmp_path / "full", depth=6, width=1.0, compensate=False)
    # Importance order permutes MLP channels and heads within KV groups: the same function, summed in
    # another order, so fp32 agreement is ~1e-5 rather than bitwise.
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(IDS).logits, load_model(tiny_dir)(IDS).logits,
                                   atol=5e-5, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_existing_output_refused_unless_force(tiny_plan_dir, tmp_path):
    out = tmp_path / "sub"
    extract_subnet(tiny_plan_dir, out, depth=5, width=1.0)
    with pytest.raises(OutputExistsError, match="--force"):
        extract_subnet(tiny_plan_dir, out, depth=5, width=1.0)
    extract_subnet(tiny_plan_dir, out, depth=4, width=1.0, force=True)
    assert read_meta(out)["shape"]["meta"]["depth"] == 4


def test_crash_leaves_no_complete_looking_folder(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fraction", [0.6, 0.95])
def test_pick_for_params_matches_one_forward_per_row(tiny_plan_dir, monkeypatch, fraction):
    """The pick runs all calibration rows in one forward per candidate and measures a shape that both width
    modes give once (0.95: the shallow depths fit at full width); it picks what the ranking before either did —
    one forward per row, every candidate measured — with the same calibration perplexity."""
    import amoeba_export.plan.select as select
    from amoeba_export.data import measurement_rows
    from amoeba_export.extract import pick_for_params
    from amoeba_export.modelio import load_tokenizer
    from amoeba_export.plan.plan import WIDTH_MODES

    elastic, plan = load_elastic(tiny_plan_dir, depth_maps=False)
    budget = int(plan.params_for(plan.full_shape()) * fraction)
    fast = pick_for_params(elastic, plan, budget, stride=1, finalists=1)
    candidates = [s for m in WIDTH_MODES for s in sorted(plan.shapes_for_params(budget, m), key=lambda s: s.depth)]
    rows = measurement_rows("calibration", load_tokenizer(plan.model_dir), 256, 512).rows
    monkeypatch.setattr(select, "RANK_BATCH_TOKENS", 1)  # one row per forward
    slow_ppl, slow = select.rank_shapes(elastic, candidates, rows)[0]
    pick = fast.meta["pick"]
    assert fast.name == slow.name and pick["calibration_ppl"] == pytest.approx(slow_ppl, rel=1e-5)
    assert pick["ranked"] == len(candidates)
    assert pick["measured"] == len({(s.layers, s.q_heads, s.kv_heads, s.mlp) for s in candidates})
    if fraction > 0.9:
        assert pick["measured"] < pick["ranked"]


def test_pick_for_params_coarse_to_fine(tiny_plan_dir):
    """stride 1 ranks every candidate and returns the best; a coarser stride ranks fewer and returns the best of
    those it ranked, saying how many."""
    from amoeba_export.data import measurement_rows
    from amoeba_export.extract import pick_for_params
    from amoeba_export.modelio import load_tokenizer
    from amoeba_export.plan.select import rank_shapes

    elastic, plan = load_elastic(tiny_plan_dir, depth_maps=False)
    budget = plan.params_for(plan.full_shape()) * 6 // 10
    candidates = plan.shapes_for_params(budget, "uniform") + plan.shapes_for_params(budget, "global")
    rows = measurement_rows("calibration", load_tokenizer(plan.model_dir), 256, 512).rows
    best_ppl, best = rank_shapes(elastic, candidates, rows)[0]
    full = pick_for_params(elastic, plan, budget, stride=1, finalists=1)
    assert full.name == best.name and full.meta["pick"]["ranked"] == full.meta["pick"]["candidates"] == len(candidates)
    assert full.meta["pick"]["calibration_ppl"] == pytest.approx(best_ppl, rel=1e-4)
    coarse = pick_for_params(elastic, plan, budget, stride=2, finalists=1)
    pick = coarse.meta["pick"]
    assert pick["candidates"] == len(candidates) and pick["ranked"] <= len(candidates)
    assert pick["calibration_ppl"] >= best_ppl * (1 - 1e-4)
    assert plan.params_for(coarse) <= budget


def test_pick_for_params_reranks_its_leaders_on_more_tokens(tiny_plan_dir):
    """The pick is the best of the first ranking's leading distinct shapes ranked again on more calibration rows
    (spread over the split); with one finalist it is the first ranking's best."""
    from amoeba_export.data import measurement_rows
    from amoeba_export.extract import _widths, pick_for_params
    from amoeba_export.modelio import load_tokenizer
    from amoeba_export.plan.select import rank_shapes

    elastic, plan = load_elastic(tiny_plan_dir, depth_maps=False)
    budget = plan.params_for(plan.full_shape()) * 6 // 10
    candidates = plan.shapes_for_params(budget, "uniform") + plan.shapes_for_params(budget, "global")
    first = rank_shapes(elastic, candidates, measurement_rows("calibration", load_tokenizer(plan.model_dir), 256,
                                                              512).rows)
    distinct: dict = {}
    for _, shape in first:
        distinct.setdefault(_widths(shape), shape)
    leaders = list(distinct.values())[:3]
    assert len(leaders) == 3
    final_rows = measurement_rows("calibration", load_tokenizer(plan.model_dir), 256, 1024).rows
    expected = rank_shapes(elastic, leaders, final_rows)
    pick = pick_for_params(elastic, plan, budget, stride=1, finalists=3, final_tokens=1024)
    assert _widths(pick) == _widths(expected[0][1])
    final = pick.meta["pick"]["final"]
    assert final["calibration_tokens"] == 1024 and len(final["shapes"]) == 3
    assert final["calibration_ppl"][0] == pytest.approx(expected[0][0], rel=1e-4)
    assert final["calibration_ppl"] == sorted(final["calibration_ppl"])
    one = pick_for_params(elastic, plan, budget, stride=1, finalists=1)
    assert _widths(one) == _widths(first[0][1]) and "final" not in one.meta["pick"]
