"""ExecuTorch backend: static-KV-cache .pte via XNNPACK, per-layer widths, torchao recipes, clear errors.

Lowering is slow (tens of seconds even for a 1-layer model), so each exported artifact is a module fixture
shared by several tests: the per-layer model with ExecuTorch's custom cache/SDPA ops and the ``full_logits``
method, and a stock model with the ``masked`` baseline, one token per call (``dynamic_shape=False``) and no
extra method (prefill and validation step token by token).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from amoeba_export.backends import get_backend, load_artifact  # noqa: E402
from amoeba_export.errors import BackendError, CheckpointError  # noqa: E402
from amoeba_export.testing import tiny_amoeba_llama, tiny_llama, tiny_tokenizer  # noqa: E402

CTX = 32


def _amoeba_model(path):
    """Per-layer widths, GQA groups of 1 and 2, biases and a tied embedding."""
    return tiny_amoeba_llama(path, q_heads=(4, 2, 4), kv_heads=(2, 1, 4), mlp=(128, 40, 96), tie=True,
                             qkv_bias=True, o_proj_bias=True, down_proj_bias=True, seed=1)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()


@pytest.fixture(scope="module")
def amoeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("et_amoeba")
    model = _amoeba_model(root / "hf")
    art = get_backend("executorch").export(root / "hf", root / "fp32", "fp32", max_context=CTX,
                                           full_logits_method=True)
    return model, art


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    """hidden 48: no multiple of 32 (XNNPACK's int4 group granularity) divides it, so 4-bit recipes fall back."""
    path = tmp_path_factory.mktemp("et_stock") / "hf"
    tiny_llama(path, layers=1, hidden=48, heads=4, kv_heads=2, intermediate=64, tie=True)
    return path


IDS = [5, 17, 200, 3, 99, 41, 7, 250, 12, 64, 128, 1, 33, 77, 300, 8, 19, 2, 45, 150]


def test_per_layer_widths_fp32_matches_pytorch(amoeba):
    model, art = amoeba
    with get_backend("executorch").load(art) as runner:
        got = runner.logits(IDS)
        assert runner.vocab_size == 320
    ref = _hf_logits(model, IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    assert art.meta["shape"]["q_heads"] == [4, 2, 4] and art.meta["shape"]["mlp"] == [128, 40, 96]


def test_kv_cache_decode_equals_full_sequence(amoeba):
    """Prefill part of the prompt (forward gives its last token's logits), then one token per call: each step's
    logits equal the full-sequence ones, up to the cache's last position."""
    model, art = amoeba
    ids = (IDS * 2)[:CTX]  # fills the cache to its last slot
    ref = _hf_logits(model, ids)
    with get_backend("executorch").load(art, isolated=False) as runner:  # in-process: _step is internal
        prefill = runner._step(ids[:7], 0)
        assert prefill.shape == (1, 320)  # the last token only
        steps = [prefill] + [runner._step([t], i) for i, t in enumerate(ids[7:], start=7)]
        full = runner._step(ids, 0, full=True)
        last = runner._step(ids, 0)
        greedy = runner.generate(IDS[:7], 8)
    assert np.abs(np.concatenate(steps) - ref[6:]).max() < 1e-4
    assert np.abs(full - ref).max() < 1e-4
    assert np.abs(last[0] - full[-1]).max() < 1e-5
    # Greedy generation through the cache agrees with argmax of the full-sequence logits of its own output.
    full = _hf_logits(model, IDS[:7] + greedy[:-1])
    assert greedy == [int(x) for x in full[6:].argmax(-1)]


def test_program_metadata_and_tokenizer_for_the_llm_runner(amoeba):
    from executorch.runtime import Runtime

    _, art = amoeba
    program = Runtime.get().load_program(art.model_file)

    def const(name):
        return program.load_method(name).execute([])

    assert const("get_max_seq_len")[0] == CTX and const("get_max_context_len")[0] == CTX
    assert const("get_vocab_size")[0] == 320 and const("get_n_layers")[0] == 3
    assert const("get_bos_id")[0] == 0 and list(const("get_eos_ids")) == [0]
    assert const("use_kv_cache")[0] is True and const("use_sdpa_with_kv_cache")[0] is True
    assert set(program.method_names) >= {"forward", "full_logits", "get_max_seq_len"}
    assert (art.path / "tokenizer.json").is_file()
    with get_backend("executorch").load(art) as runner:
        assert runner.tokenize("the cat sat") == tiny_tokenizer(320)("the cat sat")["input_ids"]
    meta = art.meta
    assert meta["export_peak_rss_gb"] > 0 and meta["export_seconds"] > 0 and meta["lowering_seconds"] > 0
    assert meta["attention"] == "custom" and meta["methods"] == ["forward", "full_logits"]
    stages = meta["export_stages"]
    assert set(stages) == {"load", "quantize", "torch.export", "to_edge_transform_and_lower", "to_executorch",
                           "serialize"}
    assert all(s["seconds"] >= 0 and s["peak_rss_gb"] > 0 for s in stages.values())
    assert meta["export_peak_rss_gb"] == max(s["peak_rss_gb"] for s in stages.values())
    assert meta["files"]["model.pte"]["bytes"] == meta["model_bytes"]


def test_prompt_longer_than_cache_is_a_clear_error(amoeba):
    _, art = amoeba
    with get_backend("executorch").load(art) as runner:
        with pytest.raises(BackendError, match="max_context >= 33"):
            runner.logits(list(range(CTX + 1)))
        with pytest.raises(BackendError, match="max_context"):
            runner.generate(IDS, CTX)


@pytest.fixture(scope="module")
def stock_masked(stock_dir, tmp_path_factory):
    """The previous module (masked attention over the whole cache, the benchmark's baseline), one token per call."""
    out = tmp_path_factory.mktemp("et_masked") / "fp32"
    return get_backend("executorch").export(stock_dir, out, "fp32", max_context=CTX, attention="masked",
                                            dynamic_shape=False)


def test_masked_static_program_steps_through_the_prompt(stock_dir, stock_masked):
    """No full_logits method and a one-token forward: the runner feeds prompts token by token, and logits,
    the last-token prefill and greedy generation still equal PyTorch's full forward."""
    from amoeba_export.modelio import load_model

    model = load_model(stock_dir)
    ref = _hf_logits(model, IDS)
    with get_backend("executorch").load(stock_masked, isolated=False) as runner:
        got = runner.logits(IDS)
        last = runner._step(IDS, 0)
        greedy = runner.generate(IDS[:7], 6)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    assert last.shape == (1, 320) and np.abs(last[0] - ref[-1]).max() < 1e-4
    assert greedy == [int(x) for x in _hf_logits(model, IDS[:7] + greedy[:-1])[6:].argmax(-1)]
    meta = stock_masked.meta
    assert meta["attention"] == "masked" and meta["methods"] == ["forward"]
    assert meta["program_metadata"]["use_sdpa_with_kv_cache"] is False
    assert meta["program_metadata"]["enable_dynamic_shape"] is False


@pytest.mark.parametrize("which", ["amoeba", "stock_masked"])
def test_runs_in_executorchs_own_llm_runner(request, which):
    """ExecuTorch's TextLLMRunner (the wheel's C++ runner: reads the metadata methods, prefills in one call or
    token by token as enable_dynamic_shape says) loads the program and generates through the custom ops.

    Only counts are compared: a random model emits partial UTF-8 pieces, which the runner's Python binding
    cannot hand to a callback. (On a model whose greedy text is ASCII, both runners print the same text.)
    """
    from amoeba_export.backends.executorch.module import load_custom_ops

    runner_mod = pytest.importorskip("executorch.extension.llm.runner")
    fixture = request.getfixturevalue(which)
    art = fixture[1] if which == "amoeba" else fixture
    load_custom_ops()
    stats = []
    et = runner_mod.TextLLMRunner(str(art.model_file), str(art.path / "tokenizer.json"))
    et.generate("the cat sat on the", runner_mod.GenerationConfig(echo=False, max_new_tokens=6, temperature=0.0,
                                                                   seq_len=CTX), stats_callback=stats.append)
    with get_backend("executorch").load(art) as ours:
        prompt = ours.tokenize("the cat sat on the")
    # Its stats count the first new token (sampled from the prefill's logits) apart from the generated ones.
    assert stats and stats[-1].num_prompt_tokens == len(prompt) and stats[-1].num_generated_tokens == 5


def test_corrupt_pte_is_a_clear_error(amoeba, tmp_path):
    _, art = amoeba
    bad = tmp_path / "bad"
    shutil.copytree(art.path, bad)
    data = (bad / "model.pte").read_bytes()
    (bad / "model.pte").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.pte is truncated or altered"):
        artifact, backend = load_artifact(bad)  # sizes are checked on open
        backend.load(artifact)


def test_unknown_and_disabled_recipes_and_options(stock_dir, tmp_path):
    backend = get_backend("executorch")
    with pytest.raises(BackendError, match="unknown quant type"):
        backend.export(stock_dir, tmp_path / "a", "q3_k")
    with pytest.raises(BackendError, match="disabled.*8da8w"):
        backend.export(stock_dir, tmp_path / "b", "int8wo")
    with pytest.raises(BackendError, match="unknown ExecuTorch export option"):
        backend.export(stock_dir, tmp_path / "c", "fp32", bogus=1)
    with pytest.raises(BackendError, match="attention must be one of custom, masked"):
        backend.export(stock_dir, tmp_path / "d", "fp32", attention="flash")
    with pytest.raises(BackendError, match="full_logits_method needs dynamic_shape"):
        backend.export(stock_dir, tmp_path / "e", "fp32", full_logits_method=True, dynamic_shape=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_indivisible_group_size_is_an_error_without_fallback(stock_dir, tmp_path):
    with pytest.raises(BackendError, match="group size 32 does not divide.*in_features 48"):
        get_backend("executorch").export(stock_dir, tmp_path / "x", "8da4w", max_context=CTX, group_fallback=False)
    assert not (tmp_path / "x").exists()


def _eager_reference(hf_dir, recipe_name, ids):
    """The same StaticCacheLM with the same torchao recipe, run in PyTorch."""
    from amoeba_export.backends.executorch.module import FullLogits, StaticCacheLM
    from amoeba_export.backends.executorch.recipes import apply_recipe, get_recipe
    from amoeba_export.modelio import load_model

    with torch.no_grad():
        module = StaticCacheLM(load_model(hf_dir), CTX).eval()
        apply_recipe(module, get_recipe(recipe_name))  # round-to-nearest recipes: no calibration
        return FullLogits(module)(torch.tensor([ids]), torch.tensor([0]))[0].numpy()


# recipe -> max |Δlogit| allowed vs torchao eager, as a fraction of the eager logits' largest magnitude.
# XNNPACK's dynamic int8 activation quantization rounds differently from torchao's eager ops: measured
# ≈ 0.1 absolute for int4 weights and ≈ 0.012 for int8 weights, on logits of magnitude ≈ 4.
RECIPE_TOLERANCE = {"8da4w": 0.06, "8da4w-attn": 0.06, "8da4w-g128": 0.06, "8da4w-head4": 0.06, "8da8w": 0.01}


def test_mixed_recipe_keeps_the_listed_projections_in_8_bit(stock_dir):
    from amoeba_export.backends.executorch.module import StaticCacheLM
    from amoeba_export.backends.executorch.recipes import get_recipe, plan_linears
    from amoeba_export.modelio import load_model

    module = StaticCacheLM(load_model(stock_dir), CTX)
    plan, _ = plan_linears(module, get_recipe("8da4w-attn"))
    by_proj = {fqn.rsplit(".", 1)[-1]: scheme for fqn, (scheme, _) in plan.items()}
    assert {p: by_proj[p] for p in ("v_proj", "gate_proj", "up_proj", "down_proj", "lm_head")} == dict.fromkeys(
        ("v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"), "8da8w")
    assert all(s == "8da4w" for fqn, (s, g) in plan.items() if fqn.endswith(("q_proj", "o_proj")) and g)


@pytest.mark.parametrize("recipe", sorted(RECIPE_TOLERANCE))
def test_recipe_matches_torchao_eager(stock_dir, tmp_path, recipe):
    backend = get_backend("executorch")
    art = backend.export(stock_dir, tmp_path / recipe, recipe, max_context=CTX)
    ref = _eager_reference(stock_dir, recipe, IDS)
    with backend.load(art) as runner:
        got = runner.logits(IDS)
    err = np.abs(got - ref).max()
    assert err <= RECIPE_TOLERANCE[recipe] * np.abs(ref).max(), f"{recipe}: max |Δlogit| {err:.4g}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    notes = " ".join(art.meta["notes"])
    if recipe.startswith("8da4w"):  # no multiple of 32 divides 48: the 8-bit fallback is named, never silent
        assert "does not divide" in notes and "in_features 48 → 8da8w per channel" in notes


@pytest.mark.slow
def test_real_subnet_fp32_passes_gate(tmp_path):
    """A small per-layer-width slice of the default model exports to fp32 .pte and passes the fp32 gate."""
    from amoeba_export.elastic import make_elastic
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.extract import write_subnet
    from amoeba_export.modelio import load_model, resolve_model
    from amoeba_export.shape import ModelDims, Shape

    hf = resolve_model("default")
    model = load_model(hf)
    dims = ModelDims.from_config(model.config)
    shape = Shape((0, 1, 29), (9, 6, 3), (3, 3, 3), (1536, 768, 1024), name="et-slice")
    sub = write_subnet(make_elastic(model), shape.validate(dims), tmp_path / "sub", source_dir=hf)
    del model
    art = get_backend("executorch").export(sub, tmp_path / "fp32", "fp32", max_context=256)
    report = validate_artifact(art.path, sub, max_tokens=512, seq_len=256)
    assert report.passed and report.metrics["top1_agreement"] >= 0.99


def test_xnnpack_passes_are_skipped_only_where_they_cannot_act(stock_dir, tmp_path, monkeypatch):
    """Lowering with the pass filter gives the very same .pte as ExecuTorch's full pass list, while at least
    one partition ran fewer passes (so the comparison is not vacuous)."""
    import contextlib

    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    from amoeba_export.backends.executorch import backend as et
    from amoeba_export.backends.executorch.xnnpack_passes import PASS_TRIGGERS, needed

    ran: list[list[str]] = []
    transform = XNNPACKPassManager.transform

    def spy(self):
        ran.append([p.__name__ for p in self.passes])
        return transform(self)

    monkeypatch.setattr(XNNPACKPassManager, "transform", spy)
    backend = get_backend("executorch")
    filtered = backend.export(stock_dir, tmp_path / "filtered", "8da4w-attn", max_context=CTX)
    with_filter, ran[:] = list(ran), []
    monkeypatch.setattr(et, "only_passes_that_can_act", contextlib.nullcontext)
    every = backend.export(stock_dir, tmp_path / "every", "8da4w-attn", max_context=CTX)
    assert len(with_filter) == len(ran) > 0
    assert any(len(a) < len(b) for a, b in zip(with_filter, ran))
    assert all(set(b) - set(a) <= set(PASS_TRIGGERS) for a, b in zip(with_filter, ran))
    assert filtered.model_file.read_bytes() == every.model_file.read_bytes()
    # a partition with a trigger op keeps its pass
    assert needed("ConvertToSDPAPass", {"aten._softmax.default"}) and not needed("ConvertToSDPAPass", {"aten.mm"})
    assert needed("ConvertToLinearPass", set())  # passes without triggers always run
