"""GGUF backend: logits vs PyTorch per quant type, per-layer widths (deci), tokenizer, errors, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact
from amoeba_export.backends.gguf.writer import plan_gguf
from amoeba_export.errors import BackendError, CheckpointError, RuntimeMissingError, ValidationFailedError
from amoeba_export.evaluation.validate import validate_artifact
from amoeba_export.modelio import load_model, load_tokenizer
from amoeba_export.testing import TEXT, tiny_amoeba_llama, tiny_llama

IDS = [3, 17, 42, 99, 150, 7, 260, 31, 5, 77, 300, 12, 64, 128, 200, 1]
SAMPLE = ("The cat sat on the mat, 12 times in 2024!\n  Indented code: x = f(3.14)  # ok\n"
          "an elastic model has any depth and any width. hello tiny world! ü ñ — “quotes”")
# max |Δlogit| / max |logit| against PyTorch fp32 on the unit-gain hidden-256 tiny model below (rows fit every
# block size); about twice what llama-cpp-python 0.3.36 gives (F32 8e-7, F16 9e-4, Q8_0 0.027, Q6_K 0.066,
# Q5_K_M 0.12, Q4_K_M 0.27, Q4_0 0.33: activations are quantized too).
REL_TOLERANCE = {"F32": 1e-5, "F16": 3e-3, "Q8_0": 0.06, "Q6_K": 0.15, "Q5_K_M": 0.25, "Q4_K_M": 0.5, "Q4_0": 0.6}


def reference_logits(hf_dir, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return load_model(hf_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()


def per_layer_model(out, *, tie: bool = False, seed: int = 0):
    """A per-layer-width amoeba_llama with every compensation bias, random weights."""
    tiny_amoeba_llama(out, q_heads=(2, 4, 4), kv_heads=(2, 2, 1), mlp=(128, 32, 96), tie=tie, qkv_bias=True,
                      o_proj_bias=True, down_proj_bias=True, seed=seed)
    return out


@pytest.fixture(scope="module")
def gguf():
    return get_backend("gguf")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf")
    (path / "text.txt").write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def tiny(root):
    tiny_llama(root / "tiny")
    return root / "tiny"


@pytest.fixture(scope="module")
def wide(root):
    """Rows of 256 so k-quants apply without fallback; unit-gain projections so quantization error is not
    amplified layer by layer as in a random model with large weights."""
    tiny_llama(root / "wide", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
    weights = load_file(str(root / "wide" / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            weights[name] = w / (0.15 * w.shape[1] ** 0.5)  # tiny_llama draws weights with std 0.15
    save_file(weights, str(root / "wide" / "model.safetensors"), metadata={"format": "pt"})
    return root / "wide"


def runner_logits(gguf, artifact, ids=IDS) -> np.ndarray:
    with gguf.load(artifact, threads=2) as runner:
        return runner.logits(ids)


def test_f32_matches_pytorch(gguf, tiny, root):
    artifact = gguf.export(tiny, root / "f32", "F32", progress=False)
    assert artifact.meta["gguf"]["arch"] == "llama" and artifact.meta["notes"] == []
    got, want = runner_logits(gguf, artifact), reference_logits(tiny)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("quant", list(REL_TOLERANCE))
def test_each_quant_type_within_its_tolerance(gguf, wide, root, quant):
    artifact = gguf.export(wide, root / f"wide-{quant}", quant, progress=False)
    want = reference_logits(wide)
    err = np.abs(runner_logits(gguf, artifact) - want).max() / np.abs(want).max()
    assert err <= REL_TOLERANCE[quant], f"{quant}: relative max error {err:.3g}"
    assert artifact.meta["gguf"]["fallback_tensors"] == []
    if quant not in ("F32", "F16"):
        assert artifact.meta["model_bytes"] < (root / "wide" / "model.safetensors").stat().st_size / 2


def test_kquant_fallback_is_reported(gguf, tiny, root):
    artifact = gguf.export(tiny, root / "tiny-q4km", "Q4_K_M", progress=False)
    fallback = artifact.meta["gguf"]["fallback_tensors"]
    assert fallback and all(t["row"] % 256 for t in fallback)
    assert any("could not use Q4_K-family types" in note for note in artifact.meta["notes"])


def test_per_layer_widths_use_deci_and_match(gguf, root):
    for tie in (False, True):
        hf = per_layer_model(root / f"perlayer-{tie}", tie=tie)
        artifact = gguf.export(hf, root / f"perlayer-{tie}-f32", "F32", progress=False)
        assert artifact.meta["gguf"]["arch"] == "deci"
        assert np.abs(runner_logits(gguf, artifact) - reference_logits(hf)).max() <= 1e-4
    f16 = gguf.export(hf, root / "perlayer-f16", "F16", progress=False)
    report = validate_artifact(f16.path, hf, text_file=root / "text.txt", seq_len=64, max_tokens=512,
                               progress=False)
    assert report.passed and report.gate == "gguf/F16"


def test_uniform_model_with_biases_keeps_llama_arch(gguf, root):
    hf = root / "biased"
    tiny_llama(hf)  # then made a stock Llama with attention_bias/mlp_bias, as compensated extraction writes
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(attention_bias=True, mlp_bias=True)
    (hf / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(hf / "model.safetensors"))
    for i in range(4):
        for proj, n in (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32),
                        ("self_attn.o_proj", 64), ("mlp.gate_proj", 128), ("mlp.up_proj", 128), ("mlp.down_proj", 64)):
            weights[f"model.layers.{i}.{proj}.bias"] = 0.1 * torch.randn(n)
    save_file(weights, str(hf / "model.safetensors"))
    artifact = gguf.export(hf, root / "biased-f32", "F32", progress=False)
    assert artifact.meta["gguf"]["arch"] == "llama"
    assert np.abs(runner_logits(gguf, artifact) - reference_logits(hf)).max() <= 1e-4


def test_tokenizer_round_trip_and_cached_generation(gguf, tiny, root):
    artifact = Artifact.open(root / "f32") if (root / "f32").exists() else gguf.export(tiny, root / "f32", "F32")
    tok = load_tokenizer(tiny)
    with gguf.load(artifact) as runner:
        for text in (SAMPLE, TEXT[:500], "  two  spaces\n\n\tand tabs<|endoftext|>"):
            assert runner.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"], text
        new = runner.generate(IDS, 10)
        assert new == [int(t) for t in runner.logits(IDS + new[:-1])[len(IDS) - 1:].argmax(-1)]
        assert runner.generate(IDS, 10, stop_ids=[new[3]]) == new[:4]
        assert runner.generate(IDS, 10, temperature=0.8, seed=3) == runner.generate(IDS, 10, temperature=0.8, seed=3)


def test_swapped_tensors_are_caught_by_validation(gguf, tiny, root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    w = load_file(str(broken / "model.safetensors"))
    a, b = "model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    w[a], w[b] = w[b].clone(), w[a].clone()
    save_file(w, str(broken / "model.safetensors"))
    artifact = gguf.export(broken, tmp_path / "broken-f16", "F16", progress=False)
    with pytest.raises(ValidationFailedError, match="gguf/F16"):
        validate_artifact(artifact.path, tiny, text_file=root / "text.txt", seq_len=64, max_tokens=256,
                          progress=False)


def test_truncated_and_corrupt_files_give_clear_errors(gguf, tiny, root, tmp_path):
    artifact = gguf.export(tiny, tmp_path / "a", "F16", progress=False)
    data = artifact.model_file.read_bytes()
    artifact.model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        gguf.load(artifact)
    artifact.model_file.write_bytes(b"NOTAGGUF" + data[8:])  # same size, bad magic
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        gguf.load(artifact)
    with pytest.raises(CheckpointError, match="llama.cpp cannot load"):  # unchecked, the runtime says why
        gguf.load(artifact, checksums=False)


def test_bad_inputs(gguf, tiny, tmp_path, monkeypatch):
    with pytest.raises(BackendError, match="unknown quant type 'Q3_K'.*Q4_K_M"):
        gguf.export(tiny, tmp_path / "x", "Q3_K")
    with pytest.raises(BackendError, match="unknown gguf export option"):
        gguf.export(tiny, tmp_path / "x", "F16", nonsense=1)
    assert not (tmp_path / "x").exists()
    cfg = json.loads((tiny / "config.json").read_text())
    bad = tmp_path / "ffn0"
    bad.mkdir()
    cfg.update(model_type="amoeba_llama", layer_num_attention_heads=[4] * 4, layer_num_key_value_heads=[2] * 4,
               layer_intermediate_sizes=[128, 0, 128, 64])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendError, match="layer 1 has attention but an MLP width of 0"):
        plan_gguf(bad)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(RuntimeMissingError, match=r"amoeba-export\[gguf\]"):
        get_backend("gguf")


def test_cli_export_validates_and_fails_clearly(tiny, root, tmp_path, capsys):
    from amoeba_export.cli import main

    common = ["--text-file", str(root / "text.txt"), "--seq-len", "64", "--max-tokens", "256"]
    assert main(["export", str(tiny), "--backend", "gguf", "--quant", "F16", "--out", str(tmp_path / "a"),
                 "--validate", *common]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "a"), *common]) == 0
    assert main(["export", str(tiny), "--quant", "Q3_K", "--out", str(tmp_path / "b")]) == 2
    assert "unknown quant type 'Q3_K'" in capsys.readouterr().err


def test_killed_export_leaves_nothing_that_looks_complete(tiny, tmp_path):
    out = tmp_path / "killed"
    script = f"""
import os, signal
from amoeba_export.backends.gguf import backend
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)   # the model file is written; meta.json is not
backend.census = die
from amoeba_export.backends import get_backend
get_backend("gguf").export({str(tiny)!r}, {str(out)!r}, "F16", progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
    assert leftovers and any(p.suffix == ".gguf" for p in leftovers[0].iterdir())  # it got as far as the file
    for p in leftovers:
        with pytest.raises(CheckpointError, match="incomplete"):
            Artifact.open(p)


@pytest.mark.slow
def test_default_model_f16_passes_its_gate_and_tokenizes_like_hf(gguf, tmp_path):
    from amoeba_export.resources import default_model_dir

    model = default_model_dir()
    artifact = gguf.export(model, tmp_path / "smol-f16", "F16", progress=False)
    report = validate_artifact(artifact.path, model, max_tokens=1024, progress=False)
    assert report.passed, report.table()
    tok = load_tokenizer(model)
    with gguf.load(artifact) as runner:
        assert runner.tokenize(SAMPLE) == tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert os.path.getsize(artifact.model_file) == artifact.meta["model_bytes"]


def test_quantized_gguf_decodes_on_this_machine():
    """Q8_0 and a k-quant through llama-cpp-python as built here; a crash of the runtime fails this test."""
    from amoeba_export.backends.gguf import selfcheck

    result = selfcheck.run_check()  # uncached: this build on this CPU
    assert set(result["quants"]) == {"Q8_0", "Q4_K_M"}
    assert "Q8_0" in result["quants"]["Q8_0"]["types"]
    assert "Q4_K" in result["quants"]["Q4_K_M"]["types"]  # rows of 256: the k-quant is really used
    for quant in result["quants"].values():
        assert len(quant["tokens"]) == selfcheck.NEW_TOKENS
