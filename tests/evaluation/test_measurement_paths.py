"""Every measurement reads data.measurement_rows: the demo table, deploy search, validation, extract --params.

Each path's figure is compared with the same model's perplexity computed here, independently (the plain HF
model, no elastic code), on the helper's rows — and shown to differ from the figure on the split's first
tokens, so a path that went back to reading those would fail.
"""

from __future__ import annotations

import math

import pytest

from amoeba_export.data import chunks, measurement_rows, split_tokens
from amoeba_export.evaluation.perplexity import hf_logits_fn, perplexity
from amoeba_export.modelio import load_model, load_tokenizer


def _reference(model_dir, seq_len: int, tokens: int, split: str = "heldout") -> tuple[float, float, str]:
    """HF perplexity on the helper's rows, on the split's first tokens, and the helper's label."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    measured = measurement_rows(split, tok, seq_len, tokens)
    first = chunks(split_tokens(split, tok), seq_len, tokens)
    spread, start = perplexity(hf_logits_fn(model), measured.rows), perplexity(hf_logits_fn(model), first)
    assert abs(spread / start - 1) > 1e-3, "the test cannot tell the two row sets apart"
    return spread, start, measured.label()


def test_deploy_search_measures_on_spread_rows(tiny_plan_dir):
    from amoeba_export.deploy.search import measure_perplexities
    from amoeba_export.plan import load_elastic

    class NoCache:  # every figure measured now, none read from an earlier run
        def get(self, shape):
            return None

        def put(self, shape, value):
            pass

    elastic, plan = load_elastic(tiny_plan_dir)
    (ppl,), label = measure_perplexities(elastic, plan, [plan.full_shape()], NoCache(), eval_tokens=256,
                                         seq_len=64, progress=False)
    spread, start, want_label = _reference(plan.model_dir, 64, 256)
    assert ppl == pytest.approx(spread, rel=1e-4) and ppl != pytest.approx(start, rel=1e-4)
    assert label == want_label and "256 tokens of the held-out split" in label


def test_validation_measures_on_spread_rows(tiny_plan_dir, tmp_path):
    from amoeba_export.backends import get_backend
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.plan import Plan

    model_dir = Plan.load(tiny_plan_dir).model_dir
    artifact = get_backend("pytorch").export(model_dir, tmp_path / "pt", "F32")
    report = validate_artifact(artifact.path, model_dir, seq_len=64, max_tokens=256, progress=False)
    spread, start, _ = _reference(model_dir, 64, 256)
    assert report.metrics["ref_ppl"] == pytest.approx(spread, rel=1e-4)
    assert report.metrics["ref_ppl"] != pytest.approx(start, rel=1e-4)
    assert report.text.startswith("the held-out split") and report.tokens == 256


def test_extract_params_ranks_on_spread_calibration_rows(tiny_plan_dir, monkeypatch):
    import amoeba_export.plan.select as select
    from amoeba_export.extract import pick_for_params
    from amoeba_export.plan import load_elastic

    seen = []
    real = select.rank_shapes

    def spy(elastic, shapes, rows, *args, **kwargs):
        seen.append(rows)
        return real(elastic, shapes, rows, *args, **kwargs)

    monkeypatch.setattr(select, "rank_shapes", spy)
    elastic, plan = load_elastic(tiny_plan_dir)
    pick_for_params(elastic, plan, plan.params_for(plan.full_shape(), compensate=False) // 2)
    calib = split_tokens("calibration", load_tokenizer(plan.model_dir))
    rows, final = seen[0], seen[-1]  # the same rows for the coarse and the fine pass, more for the finalists
    assert rows.shape == (2, 256) and all(r.equal(rows) for r in seen[:-1])
    assert final.shape == (8, 256)
    # not lcet10.txt's first tokens: each row is a window of the split, the first well inside it
    for some in (rows, final):
        starts = [next(int(i) for i in (calib == r[0]).nonzero().flatten() if calib[int(i): int(i) + 256].equal(r))
                  for r in some]
        assert starts[0] > calib.numel() // (len(some) + 2) and all(b >= a + 256 for a, b in zip(starts, starts[1:]))


def test_demo_table_measures_on_spread_rows(tiny_dir, tmp_path, monkeypatch):
    import amoeba_export.demo as demo

    monkeypatch.setattr(demo, "cache_subdir", lambda *parts: tmp_path.joinpath(*parts))
    rows = demo.run_demo(str(tiny_dir), eval_tokens=1024, speed_tokens=32, targets=(0.5,))
    spread, start, label = _reference(tiny_dir, 512, 1024)
    assert rows[0].name == "full" and rows[0].ppl == pytest.approx(spread, rel=1e-4)
    assert rows[0].ppl != pytest.approx(start, rel=1e-4)
    assert f"held-out ppl: perplexity over {label}" in demo.format_table(rows)
    assert math.isfinite(rows[1].ppl) and rows[1].ppl_text == label
