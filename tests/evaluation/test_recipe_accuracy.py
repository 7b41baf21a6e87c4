"""The benchmarks' torchao-eager recipe measure on a tiny Llama: metrics consistent, fp32 reference reusable."""

import pytest
import torch

pytest.importorskip("torchao")


def test_measure_8da8w_close_and_8da4w_further(tiny_dir):
    from amoeba_export.evaluation.recipe_accuracy import measure, reference, rows_perplexity
    from amoeba_export.modelio import load_model

    rows = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    model = load_model(tiny_dir)
    ref = reference(model, rows)
    with torch.no_grad():  # the static-cache module computes the model's own logits
        hf = model(input_ids=rows, use_cache=False).logits
    assert rows_perplexity(hf, rows) == pytest.approx(ref.ppl, rel=1e-4)

    m8 = measure(tiny_dir, "8da8w", rows, ref=ref)
    assert m8 == measure(tiny_dir, "8da8w", rows)  # the reference computed inside is the same
    assert m8["fp32_ppl"] == ref.ppl and m8["ppl_ratio"] == pytest.approx(m8["ppl"] / ref.ppl)
    m4 = measure(tiny_dir, "8da4w", rows, ref=ref)
    assert 0 <= m8["kl"] < m4["kl"] and m8["top1"] >= m4["top1"] and 0 <= m4["top1"] <= 1
