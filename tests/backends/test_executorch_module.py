"""The exportable decoder in PyTorch (no lowering, so every family and both attentions run in seconds).

Numerics only: each attention's full-sequence logits equal the HF model's, prefill's last-token logits equal
the full logits' last row, and decoding through the cache (up to and including its last slot) equals the
full forward — for stock families (with llama3 RoPE, Qwen3's q/k norms, biases) and per-layer widths.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("executorch")

from amoeba_export.backends.executorch.module import (  # noqa: E402
    ATTENTION,
    FullLogits,
    StaticCacheLM,
    attention_kind,
)
from amoeba_export.errors import BackendError  # noqa: E402
from amoeba_export.testing import tiny_amoeba_llama, tiny_family  # noqa: E402

CTX = 24
IDS = [5, 17, 200, 3, 99, 41, 7, 250, 12, 64, 128, 1, 33, 77, 300, 8, 19, 2, 45, 150, 6, 90, 222, 31]
assert len(IDS) == CTX  # the decode test fills the cache to its last slot

MODELS = {
    # GQA groups 2, 2 and 1 (a layer with as many KV heads as query heads), biases, tied embedding.
    "per-layer": lambda: tiny_amoeba_llama(q_heads=(4, 2, 4), kv_heads=(2, 1, 4), mlp=(128, 40, 96), tie=True,
                                           qkv_bias=True, o_proj_bias=True, down_proj_bias=True, seed=1),
    "llama3": lambda: tiny_family("llama3", layers=2),
    "qwen2": lambda: tiny_family("qwen2", layers=2),
    "qwen3": lambda: tiny_family("qwen3", layers=2),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_ref(request):
    model = MODELS[request.param]()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([IDS]), use_cache=False).logits[0]
    return model, ref


@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_full_logits_last_token_and_decode_match_pytorch(model_and_ref, attention):
    model, ref = model_and_ref
    with torch.no_grad():
        lm = StaticCacheLM(model, CTX, attention=attention).eval()
        full = FullLogits(lm)(torch.tensor([IDS]), torch.tensor([0]))
        assert full.shape == (1, CTX, ref.shape[-1])
        assert (full[0] - ref).abs().max() < 1e-4

        prefill = lm(torch.tensor([IDS[:9]]), torch.tensor([0]))
        assert prefill.shape == (1, ref.shape[-1])  # last token only, as ExecuTorch's runner expects
        assert (prefill[0] - ref[8]).abs().max() < 1e-4
        # Decode one token at a time up to the cache's last position (CTX - 1).
        steps = torch.cat([lm(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate(IDS[9:], start=9)])
        assert (steps - ref[9:]).abs().max() < 1e-4


def test_last_token_equals_full_logits_last_row(model_and_ref):
    model, _ = model_and_ref
    with torch.no_grad():
        lm = StaticCacheLM(model, CTX).eval()
        full = FullLogits(lm)(torch.tensor([IDS[:13]]), torch.tensor([0]))
        last = lm(torch.tensor([IDS[:13]]), torch.tensor([0]))
    assert torch.equal(full[0, -1], last[0]) or (full[0, -1] - last[0]).abs().max() < 1e-5


def test_custom_attention_reads_only_the_filled_cache():
    """Garbage in the unwritten slots changes nothing: the custom op never reads past start_pos + T."""
    model = MODELS["per-layer"]()
    with torch.no_grad():
        lm = StaticCacheLM(model, CTX).eval()
        clean = FullLogits(lm)(torch.tensor([IDS[:10]]), torch.tensor([0]))
        for layer in lm.layers:
            layer.self_attn.k_cache.fill_(1e4)
            layer.self_attn.v_cache.fill_(float("nan"))
        dirty = FullLogits(lm)(torch.tensor([IDS[:10]]), torch.tensor([0]))
    assert torch.equal(clean, dirty)


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown ExecuTorch attention 'flash'.*custom, masked"):
        attention_kind("flash")
