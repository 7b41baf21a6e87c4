"""GGUF for every supported family: our writer against llama.cpp's own convert_hf_to_gguf.py, the
pre-tokenizer table, and the architectures the writer refuses (with the table quoted)."""

from __future__ import annotations

import json

import pytest

from amoeba_export.backends import get_backend
from amoeba_export.backends.gguf.reference import compare_with_converter, convert_reference, llama_cpp_source
from amoeba_export.backends.gguf.tokenizer import detect_pre_tokenizer
from amoeba_export.backends.gguf.writer import plan_gguf, write_gguf
from amoeba_export.errors import BackendError
from amoeba_export.modelio import load_tokenizer
from amoeba_export.testing import FAMILIES, tiny_amoeba_llama, tiny_family

IDS = [3, 17, 42, 99, 150, 7, 260, 31, 5, 77, 300, 12, 64, 128, 200, 1]
SAMPLE = ("The cat sat on the mat, 12 times in 2024! I've been 'told he's there, 'RE you sure?\n\n  x = f(3.14)"
          "  # 1234567 ok\n\tüñ — “quotes” 3..3 ------===== hello tiny world!")
SOURCE = llama_cpp_source(download=False)
needs_converter = pytest.mark.skipif(
    SOURCE is None, reason="llama-cpp-python 0.3.36 sdist not in the cache (make setup fetches it; no network here)")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_family(f, root / f) and root / f for f in FAMILIES}


@needs_converter
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_llama_cpp_converter(family_dirs, tmp_path, family):
    hf = family_dirs[family]
    # Tiny tokenizers hash to nothing the converter knows, so it is told the name our table detects; the
    # detection itself is checked against llama.cpp's tokenizer below.
    pre = detect_pre_tokenizer(json.loads((hf / "tokenizer.json").read_text()))
    for dtype in ("F32", "F16"):
        ours, theirs = tmp_path / f"ours-{dtype}.gguf", tmp_path / f"ref-{dtype}.gguf"
        write_gguf(hf, ours, dtype=dtype, progress=False)
        convert_reference(hf, theirs, outtype=dtype.lower(), pre=pre, source=SOURCE)
        found = compare_with_converter(ours, theirs, IDS)
        assert found.structure_ok, found
        assert found.kl <= 1e-5, found
    # Graphs differ only where the table says so: Qwen2 is written as llama (pruned heads), the rest as converted.
    assert found.arch == ({"qwen2": ("llama", "qwen2")}.get(family) or (found.arch[1], found.arch[1]))


@pytest.mark.parametrize("family,pre", [("qwen2", "qwen2"), ("qwen3", "qwen2"), ("llama3", "llama-bpe"),
                                        ("mistral", "gpt-2")])
def test_pre_tokenizer_detected_and_tokenizes_like_transformers(family_dirs, tmp_path, family, pre):
    gguf = get_backend("gguf")
    hf = family_dirs[family]
    artifact = gguf.export(hf, tmp_path / "f32", "F32", progress=False)  # no pre_tokenizer option needed
    tok = load_tokenizer(hf)
    with gguf.load(artifact, threads=1) as runner:
        for text in SAMPLE.split("\n") + [SAMPLE]:
            assert runner.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"], (family, text)
    from amoeba_export.backends.gguf.reference import gguf_summary

    assert gguf_summary(artifact.model_file)["meta"]["tokenizer.ggml.pre"] == pre


def test_qwen3_subnets_llama_cpp_cannot_hold_are_refused_with_the_reason(tmp_path):
    hf = tiny_amoeba_llama(tmp_path / "perlayer", q_heads=(2, 4, 4), kv_heads=(2, 2, 2), mlp=(128, 32, 96))
    cfg = json.loads((tmp_path / "perlayer" / "config.json").read_text())
    cfg["qk_norm"] = True
    (tmp_path / "perlayer" / "config.json").write_text(json.dumps(cfg))
    del hf
    with pytest.raises(BackendError, match="per-layer widths.*qwen3 graph.*--mode uniform"):
        plan_gguf(tmp_path / "perlayer")


def test_unsupported_model_type_quotes_the_table(family_dirs, tmp_path):
    import shutil

    hf = tmp_path / "gpt2"
    shutil.copytree(family_dirs["llama-tied"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendError, match="supported are: llama, mistral, qwen2, qwen3, amoeba_llama"):
        plan_gguf(hf)


def test_kquant_label_says_when_most_tensors_fell_back(family_dirs, tmp_path):
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.testing import TEXT

    gguf = get_backend("gguf")
    artifact = gguf.export(family_dirs["qwen2"], tmp_path / "q4km", "Q4_K_M", progress=False)
    label = artifact.meta["quant_label"]  # hidden 64, MLP 128: no row is a multiple of 256
    assert label.startswith("Q4_K_M (100 % ") and label.endswith(" fallback)") and "Q5_0" in label, label
    assert artifact.quant == "Q4_K_M"  # the machine key (gates, runners) stays the requested type
    note = next(n for n in artifact.meta["notes"] if "fell back" in n)
    assert "--round-to 256" in note and "hidden size 64" in note
    (tmp_path / "text.txt").write_text(TEXT)
    report = validate_artifact(artifact.path, family_dirs["qwen2"], text_file=tmp_path / "text.txt", seq_len=32,
                               max_tokens=128, progress=False, raise_on_fail=False)
    assert f"(gguf/{label})" in report.table()
    q8 = gguf.export(family_dirs["qwen2"], tmp_path / "q8", "Q8_0", progress=False)
    assert q8.meta["quant_label"] == "Q8_0"  # rows of 64 and 128 take blocks of 32 whole
