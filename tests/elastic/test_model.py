import pytest
import torch

from amoeba_export.elastic import make_elastic
from amoeba_export.errors import UnsupportedArchitectureError
from amoeba_export.shape import Shape
from amoeba_export.testing import tiny_llama


@pytest.mark.parametrize("kwargs", [
    dict(heads=6, kv_heads=2, hidden=96),  # GQA
    dict(heads=4, kv_heads=4),  # MHA
    dict(arch="qwen2", heads=6, kv_heads=2, hidden=96),  # q/k/v biases
    dict(arch="mistral"),
    dict(tie=True),
])
def test_full_shape_reproduces_original_logits(kwargs):
    model = tiny_llama(**kwargs)
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        got = make_elastic(model)(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_subnet_runs_smaller_matmuls():
    model = tiny_llama(layers=4, heads=6, kv_heads=2, hidden=96, intermediate=128)
    elastic = make_elastic(model)
    shapes_seen = []
    for block in elastic.layers:
        block.gate_proj.register_forward_hook(lambda m, i, o: shapes_seen.append(o.shape[-1]))
    shape = Shape((0, 3), (2, 4), (2, 2), (32, 64))
    logits = elastic(torch.randint(0, 320, (1, 8)), shape)
    assert logits.shape == (1, 8, 320)
    assert shapes_seen == [32, 64]  # only the kept layers ran, at their own widths


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="supported are: llama, mistral, qwen2"):
        make_elastic(model)
