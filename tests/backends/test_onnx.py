"""ONNX backend: KV-cached decoder export, onnxruntime runner, quantization recipes, error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact
from amoeba_export.errors import BackendError, CheckpointError, ConfigError, OutputExistsError
from amoeba_export.testing import tiny_amoeba_llama, tiny_llama, tiny_tokenizer

Q_HEADS, KV_HEADS, MLP = [4, 2, 2], [2, 1, 2], [128, 48, 96]
IDS = [5, 17, 101, 42, 7, 250, 3, 64, 99, 12, 180, 33]


def _amoeba_model(out):
    return tiny_amoeba_llama(out, q_heads=Q_HEADS, kv_heads=KV_HEADS, mlp=MLP, qkv_bias=True, down_proj_bias=True)


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    """A per-layer-width model (with biases), its fp32 ONNX artifact and PyTorch logits of IDS."""
    root = tmp_path_factory.mktemp("onnx_per_layer")
    model = _amoeba_model(root / "hf")
    artifact = get_backend("onnx").export(root / "hf", root / "fp32", "fp32")
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    return root, artifact, ref, model


@pytest.fixture(scope="module")
def runner(per_layer):
    _, artifact, _, _ = per_layer
    # In-process (isolated=False): these tests look inside the runner (step, cache names).
    with get_backend("onnx").load(artifact, threads=1, isolated=False) as r:
        yield r


def test_fp32_matches_pytorch_and_cache_decode_matches_full_sequence(per_layer, runner):
    _, _, ref, _ = per_layer
    full = runner.logits(IDS)
    assert full.shape == (len(IDS), 320)
    assert np.abs(full - ref).max() < 1e-4
    # Prefill 5 tokens, then decode the rest one at a time over the cache.
    logits, past = runner.step(np.array([IDS[:5]]), runner.empty_cache(1))
    steps = [logits[0]]
    for token in IDS[5:]:
        logits, past = runner.step(np.array([[token]]), past)
        steps.append(logits[0])
    assert np.abs(np.concatenate(steps) - full).max() < 1e-4
    assert past[0].shape[2] == len(IDS)


def test_dynamic_batch(runner):
    rows = np.array([IDS, IDS[::-1], [1] * len(IDS)])
    logits, past = runner.step(rows, runner.empty_cache(3))
    assert logits.shape[0] == 3 and past[0].shape[0] == 3
    for row, got in zip(rows, logits):
        assert np.abs(got - runner.logits(row.tolist())).max() < 1e-4
    nxt, _ = runner.step(np.array([[4], [5], [6]]), past)
    assert np.abs(nxt[1, -1] - runner.logits([*IDS[::-1], 5])[-1]).max() < 1e-4


def test_per_layer_widths_in_graph_and_meta(per_layer, runner):
    root, artifact, _, _ = per_layer
    assert [h for h, _ in runner.past_shapes[::2]] == KV_HEADS
    assert runner.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert runner.present_names[-1] == f"present.{len(KV_HEADS) - 1}.value"
    meta = artifact.meta
    assert meta["shape"]["mlp"] == MLP and meta["shape"]["q_heads"] == Q_HEADS
    assert meta["quant"] == "fp32" and meta["model_bytes"] == (artifact.path / "model.onnx").stat().st_size
    assert not (artifact.path / "genai_config.json").exists()  # one KV width only in onnxruntime-genai
    assert (artifact.path / "tokenizer.json").is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(artifact.model_file), providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in sess.get_inputs()}
    assert dims["input_ids"] == ["batch", "sequence_length"]
    assert dims["past_key_values.1.key"] == ["batch", 1, "past_sequence_length", 16]


def test_generate_greedy_matches_pytorch_and_sampling_is_seeded(per_layer, runner):
    _, _, _, model = per_layer
    ids = list(IDS[:6])
    expected = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(torch.tensor([ids + expected])).logits[0, -1].argmax())
            expected.append(token)
    assert runner.generate(ids, 8) == expected
    a = runner.generate(ids, 8, temperature=1.0, top_p=0.9, seed=3)
    assert a == runner.generate(ids, 8, temperature=1.0, top_p=0.9, seed=3)
    assert len(a) == 8 and all(0 <= t < 320 for t in a)
    assert runner.generate(ids, 8, stop_ids=[expected[0]]) == expected[:1]


# Quantized vs the fp32 export on random weights (hidden 64, |logits| ~ 3, so int4 moves logits a lot): the
# bounds sit below what each type measured on this model and far above what a broken quantizer (wrong
# axis or scales) gives, which is agreement near 1/vocab. Dynamic int8 scales activations per tensor, so a
# 20-token prefill and a 1-token step round differently: its cache path only matches to the quantization
# error; the weight-only types quantize activations per row and block, so theirs matches closely.
@pytest.mark.parametrize("quant, min_top1, max_err, cache_tol", [("int8", 0.9, 0.6, 1e-3),
                                                                 ("int8-dynamic", 0.85, 1.2, 1.2),
                                                                 ("int4", 0.5, 4.5, 1e-3)])
def test_quantized_close_to_fp32(per_layer, runner, quant, min_top1, max_err, cache_tol):
    root, fp32, _, _ = per_layer
    backend = get_backend("onnx")
    art = backend.export(root / "hf", root / quant, quant, fp32_onnx=fp32.path)
    assert art.meta["recipe"]["method"] in ("dynamic", "nbits")
    assert art.size_bytes < fp32.size_bytes
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 320, 32).tolist() for _ in range(4)]
    with backend.load(art, threads=1, isolated=False) as q:  # in-process: step() is the runner's internal
        got = np.concatenate([q.logits(r) for r in rows])
        want = np.concatenate([runner.logits(r) for r in rows])
        top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
        assert top1 >= min_top1, top1
        assert np.abs(got - want).max() <= max_err
        logits, past = q.step(np.array([rows[0][:20]]), q.empty_cache(1))
        for t in rows[0][20:]:
            logits, past = q.step(np.array([[t]]), past)
        assert np.abs(logits[0, -1] - got[31]).max() < cache_tol  # the cache path of the quantized graph


def test_uniform_model_external_data_and_genai_config(tmp_path):
    tiny_llama(tmp_path / "hf", layers=2, tie=True)
    artifact = get_backend("onnx").export(tmp_path / "hf", tmp_path / "out", "fp32", external_data=True)
    assert (artifact.path / "model.onnx.data").is_file()
    assert artifact.size_bytes == sum(artifact.meta["files"][f]["bytes"] for f in ("model.onnx", "model.onnx.data"))
    genai = json.loads((artifact.path / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16 and decoder["num_hidden_layers"] == 2
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    model = tiny_llama(None, layers=2, tie=True)
    with get_backend("onnx").load(artifact) as r, torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(r.logits(IDS) - ref).max() < 1e-4
        assert r.tokenize("the cat sat") == tiny_tokenizer(320)("the cat sat", add_special_tokens=False)["input_ids"]
    with pytest.raises(OutputExistsError):
        get_backend("onnx").export(tmp_path / "hf", tmp_path / "out", "fp32")
    # The tied lm_head (a runtime Transpose of the embedding) is untied so that int4 quantizes it too.
    q = get_backend("onnx").export(tmp_path / "hf", tmp_path / "int4", "int4", fp32_onnx=artifact.path,
                                   external_data=True)
    info = q.meta["graph"]["quantization"]
    assert info["untied"] == ["/lm_head/MatMul"] and info["fp32_matmuls"] == 0 and info["embedding_quantized"]
    assert (q.path / "model.onnx.data").is_file()
    with get_backend("onnx").load(q) as r:
        assert (r.logits(IDS).argmax(-1) == ref.argmax(-1)).mean() >= 0.5


def test_corrupt_model_file_gives_clear_error(per_layer, tmp_path):
    import shutil

    _, artifact, _, _ = per_layer
    broken = tmp_path / "broken"
    shutil.copytree(artifact.path, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.onnx is truncated or altered"):
        get_backend("onnx").load(Artifact.open(broken))


def test_bad_quant_and_options_give_clear_errors(per_layer, tmp_path):
    root, artifact, _, _ = per_layer
    backend = get_backend("onnx")
    with pytest.raises(BackendError, match="unknown quant type 'int3'"):
        backend.export(root / "hf", tmp_path / "x", "int3")
    with pytest.raises(BackendError, match="unknown ONNX quantization option"):
        backend.export(root / "hf", tmp_path / "x", "int4", blocksize=64)
    with pytest.raises(ConfigError, match="bits 3 not in .*block_size 48 is not a power of two"):
        backend.export(root / "hf", tmp_path / "x", "int4", bits=3, block_size=48)
    with pytest.raises(BackendError, match="not an fp32 ONNX artifact"):
        backend.export(root / "hf", tmp_path / "x", "int8", fp32_onnx=root / "int8")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_subnet_passes_fp32_gate_and_per_channel_int8_is_caught(tmp_path):
    """A small per-layer-width slice of the default model: fp32 passes its gate; per-channel int8 (which
    onnxruntime writes without complaint) must fail validation instead of being shipped."""
    from amoeba_export.elastic import make_elastic
    from amoeba_export.errors import ValidationFailedError
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.extract import write_subnet
    from amoeba_export.modelio import load_model, resolve_model
    from amoeba_export.shape import ModelDims, Shape

    hf = resolve_model("default")
    model = load_model(hf)
    dims = ModelDims.from_config(model.config)
    shape = Shape((0, 1, 2, 29), (9, 6, 3, 9), (3, 3, 3, 3), (1536, 768, 512, 1024), name="tiny-slice")
    sub = write_subnet(make_elastic(model), shape.validate(dims), tmp_path / "sub", source_dir=hf)
    del model
    backend = get_backend("onnx")
    fp32 = backend.export(sub, tmp_path / "fp32", "fp32")
    report = validate_artifact(fp32.path, sub, max_tokens=512, seq_len=256)
    assert report.passed and report.metrics["top1_agreement"] >= 0.999
    bad = backend.export(sub, tmp_path / "int8pc", "int8-dynamic", fp32_onnx=fp32.path, per_channel=True)
    with pytest.raises(ValidationFailedError, match="onnx/int8-dynamic"):
        validate_artifact(bad.path, sub, max_tokens=512, seq_len=256)
