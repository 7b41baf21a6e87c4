"""GPTQ rounding for the ExecuTorch recipes (backends/executorch/gptq.py): same grids as torchao, better codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amoeba_export.backends import get_backend
from amoeba_export.errors import BackendError
from amoeba_export.testing import tiny_llama

pytest.importorskip("torchao")

from amoeba_export.backends.executorch.gptq import GPTQSettings, gptq_qdata  # noqa: E402
from amoeba_export.backends.executorch.recipes import _config  # noqa: E402

CTX = 32
IDS = [5, 17, 200, 3, 99, 41, 7, 250, 12, 64, 128, 1, 33, 77, 300, 8, 19, 2, 45, 150]


def _torchao_weight(weight: torch.Tensor, scheme: str, group: int | None):
    """torchao's quantized tensor for ``weight`` under the recipes' config (what export ships without GPTQ)."""
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    quantize_(linear, _config(scheme, group))
    return linear.weight


def _solve(weight, hessian, qweight, **settings):
    from amoeba_export.backends.executorch.gptq import _grid

    scale, zero, group, qmin, qmax = _grid(qweight)
    return gptq_qdata(weight, hessian, scale, zero, group, qmin, qmax, GPTQSettings(**settings))[0]


def _dequant(qweight, codes):
    scale, zero = qweight.scale.float(), qweight.zero_point.float()
    group = qweight.block_size[1]
    return (codes.float() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)


@pytest.mark.parametrize(("scheme", "group"), [("8da4w", 32), ("8da8w", None)])
@pytest.mark.parametrize("act_order", [True, False])
def test_diagonal_hessian_is_torchaos_own_rounding(scheme, group, act_order):
    """With no correlation between inputs GPTQ has nothing to feed forward: the codes are torchao's, bit for bit
    (which also pins that the solve reads torchao's grid convention correctly)."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    q = _torchao_weight(w, scheme, group)
    codes = _solve(w, torch.diag(torch.rand(96) + 0.5), q, act_order=act_order, damping=0.0)
    assert torch.equal(codes, q.qdata)


def test_updated_groups_with_a_diagonal_hessian_refit_torchaos_own_scales():
    """Re-fitting each group on its (un-updated) weights must give back torchao's HQQ scales and codes."""
    from amoeba_export.backends.executorch.gptq import _grid

    torch.manual_seed(1)
    w = torch.randn(40, 128)
    q = _torchao_weight(w, "8da4w", 32)
    scale, zero, group, qmin, qmax = _grid(q)
    codes, fitted = gptq_qdata(w, torch.diag(torch.rand(128) + 0.5), scale, zero, group, qmin, qmax,
                               GPTQSettings(act_order=False, groups="updated", damping=0.0))
    assert torch.equal(fitted, q.scale) and torch.equal(codes, q.qdata)
    with pytest.raises(BackendError, match="no act-order"):
        GPTQSettings(groups="updated")


def test_gptq_beats_round_to_nearest_on_outlier_channels():
    """Inputs with a few 30× channels and correlated features (what small LLMs feed their MLPs): on held-out
    inputs from the same distribution GPTQ's output error is well under round-to-nearest's, on the same grid."""
    torch.manual_seed(0)
    n_in, n_out = 128, 64
    mix = torch.randn(n_in, n_in) / n_in ** 0.5 + torch.eye(n_in)
    gain = torch.ones(n_in)
    gain[[3, 40, 77]] = 30.0

    def inputs(n):
        return (torch.randn(n, n_in) @ mix) * gain

    w = torch.randn(n_out, n_in) * 0.05
    x = inputs(4096).double()
    q = _torchao_weight(w, "8da4w", 32)
    codes = _solve(w, x.T @ x / len(x), q)
    held = inputs(2048)
    ref = held @ w.T
    err_rtn = (held @ _dequant(q, q.qdata).T - ref).pow(2).mean().item()
    err_gptq = (held @ _dequant(q, codes).T - ref).pow(2).mean().item()
    # measured 0.68× with the shipped settings (damping 0.1), 0.34× at the reference's 0.01
    assert err_gptq <= 0.8 * err_rtn, (err_gptq, err_rtn)
    assert codes.min() >= -8 and codes.max() <= 7


def _tiny(path):
    """hidden 64 / intermediate 96: int4 groups of 32 divide every width, so the int4 path is exercised."""
    return tiny_llama(path, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, tie=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("et_gptq") / "hf"
    _tiny(path)
    return path


def _calibrated_module(hf_dir, recipe_name):
    from amoeba_export.backends.executorch.module import StaticCacheLM
    from amoeba_export.backends.executorch.recipes import apply_recipe, calibration_for, get_recipe
    from amoeba_export.modelio import load_model

    recipe = get_recipe(recipe_name)
    model = load_model(hf_dir)
    module = StaticCacheLM(model, CTX).eval()
    with torch.no_grad():
        notes, summary = apply_recipe(module, recipe, calibration=calibration_for(hf_dir, model, recipe))
    return module, notes, summary


def test_recipe_without_calibration_is_an_error(tiny_dir):
    from amoeba_export.backends.executorch.module import StaticCacheLM
    from amoeba_export.backends.executorch.recipes import apply_recipe, get_recipe
    from amoeba_export.modelio import load_model

    with pytest.raises(BackendError, match="needs calibration rows"):
        apply_recipe(StaticCacheLM(load_model(tiny_dir), CTX), get_recipe("8da4w-gptq"))


def test_every_decoder_linear_is_solved_and_codes_change(tiny_dir):
    module, notes, summary = _calibrated_module(tiny_dir, "8da4w-gptq")
    plain, _, none = _calibrated_module(tiny_dir, "8da4w")
    assert none is None
    assert summary["linears"] == 2 * 7 and summary["method"] == "gptq" and "calibration" in summary["text"]
    assert any("GPTQ rounding of 14 decoder linears" in n for n in notes)
    changed = [name for (name, a), (_, b) in zip(module.named_parameters(), plain.named_parameters(), strict=True)
               if hasattr(a, "qdata") and not torch.equal(a.qdata, b.qdata)]
    assert len(changed) >= 10, changed  # GPTQ moves codes in (nearly) every matrix; lm_head keeps torchao's
    assert not any(name.startswith("lm_head") for name in changed)


@pytest.mark.slow
def test_exported_gptq_program_matches_eager(tiny_dir, tmp_path):
    """The .pte carries GPTQ's codes: it matches the calibrated eager module (as the RTN recipes match theirs),
    and meta.json names the rounding and its calibration text."""
    from amoeba_export.backends.executorch.module import FullLogits

    backend = get_backend("executorch")
    art = backend.export(tiny_dir, tmp_path / "gptq", "8da4w-gptq", max_context=CTX)
    module, _, _ = _calibrated_module(tiny_dir, "8da4w-gptq")
    with torch.no_grad():
        ref = FullLogits(module)(torch.tensor([IDS]), torch.tensor([0]))[0].numpy()
    with backend.load(art) as runner:
        got = runner.logits(IDS)
    assert np.abs(got - ref).max() <= 0.06 * np.abs(ref).max()
    assert art.meta["rounding"]["method"] == "gptq" and art.meta["rounding"]["linears"] == 14
    assert art.meta["recipe"]["rounding"] == "gptq"


@pytest.mark.parametrize(("quant", "twin"), [("8da4w-gptq", "8da4w"), ("8da4w-attn-gptq", "8da4w-attn"),
                                             ("8da4w-attn", "8da4w-attn"), ("fp32", "fp32")])
def test_speed_calibration_exports_the_round_to_nearest_twin(quant, twin):
    """The deploy search times subnets without the GPTQ pass: the twin has the same grids, so the same bytes and
    kernels (sizing prices both alike); only the codes differ. It is exported one token per call (half the
    lowering, the same decode speed), whatever the artifact's options."""
    from dataclasses import asdict

    from amoeba_export.backends.executorch.recipes import RECIPES

    twin_options = {"max_context": 64, "dynamic_shape": False, "full_logits_method": False}
    assert get_backend("executorch").speed_twin(quant, {"max_context": 64}) == (twin, twin_options)
    assert get_backend("executorch").speed_twin(quant, {"max_context": 64, "full_logits_method": True,
                                                        "dynamic_shape": True}) == (twin, twin_options)
    assert not get_backend("executorch").option_problems(twin, twin_options)
    differs = {k for k, v in asdict(RECIPES[quant]).items() if asdict(RECIPES[twin])[k] != v}
    assert differs <= {"name", "description", "rounding", "calibration_tokens"}


def test_gguf_speed_calibration_skips_the_importance_matrix():
    assert get_backend("gguf").speed_twin("Q4_K_M", {"threads": 2}) == ("Q4_K_M", {"threads": 2, "imatrix": "off"})
