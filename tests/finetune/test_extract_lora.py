"""A trained elastic checkpoint extracts to a plain HF folder whose logits equal the elastic model with
the LoRA mixture of that shape active (fp32)."""

import pytest
import torch

from amoeba_export.extract import extract_subnet
from amoeba_export.finetune import load_trained_elastic, merge_for_shape
from amoeba_export.finetune.config import TrainConfig
from amoeba_export.finetune.model import model_adapters
from amoeba_export.finetune.trainer import train
from amoeba_export.modelio import load_model
from amoeba_export.testing import TEXT


@pytest.fixture(scope="module")
def trained(tiny_plan, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.txt"
    data.write_text(TEXT)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_plan, TrainConfig(steps=3, lr=3e-2, seq_len=16, data_files=(str(data),)), root / "run",
              progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "run"


@pytest.mark.parametrize("depth, width", [(4, 1.0), (3, 0.75), (2, 0.5)])
def test_extracted_subnet_equals_elastic_with_lora(trained, tmp_path, depth, width):
    elastic, plan, gate = load_trained_elastic(trained)
    assert gate is not None and not gate.training
    assert any(float(ad.lora_B.abs().max()) > 0 for ad in model_adapters(elastic))
    shape = plan.shape(depth, width)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(depth))
    with torch.no_grad():
        merge_for_shape(elastic, shape)
        want = elastic(ids, shape)  # adapters active (unmerged two-matmul path)
        out = extract_subnet(trained, tmp_path / "sub", depth=depth, width=width)
        got = load_model(out)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if depth < 4:  # the LoRA really matters for this comparison: the base model differs
        base = extract_subnet(plan.path, tmp_path / "base", depth=depth, width=width)
        with torch.no_grad():
            base_logits = load_model(base)(input_ids=ids, use_cache=False).logits
        assert (base_logits - want).abs().max() > 1e-3
