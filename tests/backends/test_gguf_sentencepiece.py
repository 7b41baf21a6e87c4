"""GGUF for SentencePiece-style tokenizers (Llama 2, Mistral: tokenizer.model and/or a byte-fallback BPE
tokenizer.json): our writer against llama.cpp's convert_hf_to_gguf.py, llama.cpp's tokenization against
transformers', the pretokenizers.json entries, and the tokenizers it refuses."""

from __future__ import annotations

import json
import shutil

import pytest

from amoeba_export.backends import get_backend
from amoeba_export.backends.gguf.reference import (
    compare_with_converter,
    convert_reference,
    gguf_summary,
    llama_cpp_source,
)
from amoeba_export.backends.gguf.runner import LlamaCppRunner
from amoeba_export.backends.gguf.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, build_vocab
from amoeba_export.backends.gguf.writer import write_gguf
from amoeba_export.errors import BackendError
from amoeba_export.modelio import load_tokenizer
from amoeba_export.testing import SPM_FAMILIES, SPM_VOCAB, TEXT, tiny_family

IDS = [1, 3, 17, 42, 99, 150, 7, 260, 31, 5, 77, 300, 12, 64, 128, 200, 447, 2]
# Texts that start with a visible character and hold no special token (see test_known_difference_...).
SAMPLES = ["The cat sat on the mat, 12 times in 2024! I've been 'told he's there, 'RE you sure?",
           "x = f(3.14)  # 1234567 ok\n\tüñ — “quotes” 3..3 ------===== hello tiny world!",
           "Caf\u00e9 na\u00efve \u00fcber \u2014 \u65e5\u672c\u8a9e and emoji \U0001f600 fall back to bytes.",
           "def area(r):\n    return 3.14159 * r ** 2  # circle\n\n\n  trailing  spaces  ",
           "Elastic subnets keep any depth and width: GGUF files for llama.cpp.\nIn 2024, 12 models ran."]
SOURCE = llama_cpp_source(download=False)
needs_converter = pytest.mark.skipif(
    SOURCE is None, reason="llama-cpp-python 0.3.36 sdist not in the cache (make setup fetches it; no network here)")
# transformers 4 recorded added tokens in tokenizer_config.json (as the Llama 2 and Mistral hub folders have them);
# llama.cpp's converter reads them from there, so the llama2 folder keeps that record and mistral-spm does not.
ADDED_TOKENS_DECODER = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
                        for i, t in enumerate(("<unk>", "<s>", "</s>"))}


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    out = {}
    for family in SPM_FAMILIES:
        tiny_family(family, root / family)
        out[family] = root / family
    config = out["llama2"] / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "added_tokens_decoder": ADDED_TOKENS_DECODER}))
    # The same tokenizer without tokenizer.model: what transformers 5's save_pretrained writes.
    out["json-only"] = root / "json-only"
    shutil.copytree(out["mistral-spm"], out["json-only"])
    (out["json-only"] / "tokenizer.model").unlink()
    return out


def llama_cpp_ids(path, texts):
    runner = LlamaCppRunner(path, threads=1, n_ctx=64)
    try:
        return [runner.tokenize(t) for t in texts]
    finally:
        runner.close()


def hf_ids(hf_dir, texts):
    tok = load_tokenizer(hf_dir)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@needs_converter
@pytest.mark.parametrize("family", list(SPM_FAMILIES))
def test_matches_llama_cpp_converter(spm_dirs, tmp_path, family):
    hf = spm_dirs[family]
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    write_gguf(hf, ours, dtype="F16", progress=False)
    convert_reference(hf, theirs, outtype="f16", source=SOURCE)
    found = compare_with_converter(ours, theirs, IDS)
    assert found.structure_ok, found  # tensors, tokens, scores, token types, special ids, add_bos/add_eos
    assert found.kl <= 1e-5, found
    assert found.arch == ("llama", "llama")
    meta = gguf_summary(ours)["meta"]
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert "tokenizer.ggml.merges" not in meta
    # The converter's own file and ours tokenize alike, and as transformers does.
    assert llama_cpp_ids(ours, SAMPLES) == llama_cpp_ids(theirs, SAMPLES) == hf_ids(hf, SAMPLES)
    # transformers reads our file's tokenizer back (``--model x.gguf``) as the one it was written from.
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=ours.name)
    texts = [*SAMPLES, " leading space", "a</s>b"]
    assert [back(t)["input_ids"] for t in texts] == [load_tokenizer(hf)(t)["input_ids"] for t in texts]


@needs_converter
def test_tokenizer_json_only_scores_rebuilt_from_merges(spm_dirs, tmp_path):
    hf = spm_dirs["json-only"]
    with_model = build_vocab(spm_dirs["mistral-spm"], SPM_VOCAB)
    vocab = build_vocab(hf, SPM_VOCAB)
    assert (with_model.source, vocab.source) == ("tokenizer.model", "tokenizer.json")
    # The scores rebuilt from the merges are the SentencePiece model's own, byte and normal tokens alike.
    plain = [i for i, t in enumerate(vocab.token_types) if t in (NORMAL, BYTE)]
    assert len(plain) == SPM_VOCAB - 3 and vocab.tokens == with_model.tokens
    assert [vocab.scores[i] for i in plain] == [with_model.scores[i] for i in plain]
    assert with_model.token_types[:3] == [UNKNOWN, CONTROL, CONTROL] and vocab.token_types[:3] == [CONTROL] * 3

    ours, theirs = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    write_gguf(hf, ours, dtype="F16", progress=False)
    convert_reference(hf, theirs, outtype="f16", source=SOURCE)
    # Without tokenizer.model the converter writes score -1000 for every token (gguf-py's LlamaHfVocab), so its
    # llama.cpp tokenizer merges left to right instead of in merge order: everything else must agree.
    found = compare_with_converter(ours, theirs, IDS, ignore=("tokenizer.ggml.scores",))
    assert found.structure_ok, found
    assert found.kl <= 1e-5, found
    assert set(gguf_summary(theirs)["meta"]["tokenizer.ggml.scores"]) == {-1000.0}
    expected = hf_ids(hf, SAMPLES)
    assert llama_cpp_ids(ours, SAMPLES) == expected
    assert llama_cpp_ids(theirs, SAMPLES) != expected


def test_without_sentencepiece_installed_tokenizer_json_is_read(spm_dirs, monkeypatch):
    import sys

    expected = build_vocab(spm_dirs["json-only"], SPM_VOCAB)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as when it is not installed
    vocab = build_vocab(spm_dirs["mistral-spm"], SPM_VOCAB)  # has a tokenizer.model
    assert vocab.source == "tokenizer.json" and vocab == expected


@pytest.mark.parametrize("variant", ["always", "prepend-normalizer"])
def test_other_listed_structures_tokenize_like_transformers(spm_dirs, tmp_path, variant):
    """The other pretokenizers.json ``sentencepiece`` entries, as tokenizer.json files loaded by
    PreTrainedTokenizerFast (transformers 5's LlamaTokenizer rebuilds its own Metaspace "first" whatever the file
    says): Metaspace prepend_scheme "always" (transformers 4's legacy=True) and transformers 4's Prepend + Replace
    normalizer (the Llama 2 and Mistral 7B v0.1 hub files)."""
    hf = tmp_path / variant
    shutil.copytree(spm_dirs["mistral-spm"], hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    data = json.loads((hf / "tokenizer.json").read_text())
    if variant == "always":
        data["pre_tokenizer"]["prepend_scheme"] = "always"
        expected = {"type": "Metaspace", "prepend_scheme": "always"}
    else:
        data["pre_tokenizer"] = None
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        expected = {"type": "Sequence"}
    (hf / "tokenizer.json").write_text(json.dumps(data))
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    live = json.loads(load_tokenizer(hf).backend_tokenizer.to_str())
    assert expected.items() <= (live["pre_tokenizer"] or live["normalizer"]).items()
    write_gguf(hf, tmp_path / "ours.gguf", dtype="F32", progress=False)
    # Where their llama_cpp_differs says they agree: after special tokens, and (Prepend) before leading whitespace.
    texts = SAMPLES + {"always": ["a</s>b"], "prepend-normalizer": [" Hello there", "a</s>b", "  x"]}[variant]
    assert llama_cpp_ids(tmp_path / "ours.gguf", texts) == hf_ids(hf, texts)


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_backend_export_validates_and_notes_the_known_difference(spm_dirs, tmp_path, quant):
    from amoeba_export.evaluation.validate import validate_artifact

    hf = spm_dirs["llama2"]
    gguf = get_backend("gguf")
    artifact = gguf.export(hf, tmp_path / quant, quant, progress=False)  # llama-quantize keeps the tokenizer
    assert any("follows a special token gets a space before it in llama.cpp" in n
               for n in artifact.meta["notes"]), artifact.meta["notes"]
    (tmp_path / "text.txt").write_text(TEXT)
    report = validate_artifact(artifact.path, hf, text_file=tmp_path / "text.txt", seq_len=32, max_tokens=128,
                               progress=False, raise_on_fail=False)
    assert report.passed, report.table()
    assert report.metrics["tokenizer_match"] == 1.0


def test_known_difference_leading_whitespace_and_after_special_tokens(spm_dirs, tmp_path):
    """llama.cpp's SentencePiece tokenizer (like SentencePiece itself) puts a space before text that starts with
    whitespace or follows a special token; transformers 5's Llama tokenizer does not. No GGUF metadata changes
    that, so the export notes it (pretokenizers.json's llama_cpp_differs); everything else tokenizes alike
    (tests above). The transformers 4 Prepend + Replace normalizer has no such difference."""
    hf = spm_dirs["mistral-spm"]
    write_gguf(hf, tmp_path / "ours.gguf", dtype="F32", progress=False)
    tok = load_tokenizer(hf)
    space = tok.convert_tokens_to_ids("\u2581")
    ours, theirs = llama_cpp_ids(tmp_path / "ours.gguf", [" Hello there", "a</s>b"]), hf_ids(hf, [" Hello there",
                                                                                                    "a</s>b"])
    assert ours[0] == [space, *theirs[0]]
    assert ours[1][:2] == theirs[1][:2] == [tok.convert_tokens_to_ids("\u2581a"), 2]
    assert ours[1][2:] == hf_ids(hf, ["b"])[0] != theirs[1][2:]


def _refusal(tmp_path, spm_dirs, edit):
    hf = tmp_path / "bad"
    shutil.copytree(spm_dirs["mistral-spm"], hf)
    edit(hf)
    with pytest.raises(BackendError) as err:
        build_vocab(hf, SPM_VOCAB)
    return str(err.value)


def test_unigram_sentencepiece_model_is_refused_with_the_table(spm_dirs, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    def unigram(hf):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((hf / "tokenizer.model").read_bytes())
        proto.trainer_spec.model_type = 1
        (hf / "tokenizer.model").write_bytes(proto.SerializeToString())

    message = _refusal(tmp_path, spm_dirs, unigram)
    assert "SentencePiece UNIGRAM model" in message and "supported are: BPE" in message
    assert "(export with the onnx or executorch backend" in message


def test_stale_tokenizer_model_is_refused(spm_dirs, tmp_path):
    def swap(hf):
        data = json.loads((hf / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = (t for t, i in vocab.items() if i in (300, 301))
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (hf / "tokenizer.json").write_text(json.dumps(data))

    message = _refusal(tmp_path, spm_dirs, swap)
    assert "disagree on 2 ids" in message and "remove the stale tokenizer.model" in message


def test_unlisted_structure_and_tokenizer_model_are_refused_with_the_table(spm_dirs, tmp_path):
    def split_metaspace(hf):
        config = json.loads((hf / "tokenizer_config.json").read_text())
        (hf / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
        data = json.loads((hf / "tokenizer.json").read_text())
        data["pre_tokenizer"]["split"] = True
        (hf / "tokenizer.json").write_text(json.dumps(data))

    message = _refusal(tmp_path, spm_dirs, split_metaspace)
    assert "is not one llama.cpp reproduces; supported are: Llama 2, Mistral" in message

    def unigram_json(hf):
        data = json.loads((hf / "tokenizer.json").read_text())
        data["model"] = {"type": "Unigram", "vocab": [[t, 0.0] for t in data["model"]["vocab"]]}
        (hf / "tokenizer.json").write_text(json.dumps(data))

    hf = tmp_path / "bad2"
    shutil.copytree(spm_dirs["mistral-spm"], hf)
    unigram_json(hf)
    with pytest.raises(BackendError, match="'Unigram'.*supported are: byte-level BPE .*SentencePiece-style BPE"):
        build_vocab(hf, SPM_VOCAB)


@needs_converter
def test_real_llama_vocabulary_tokenizes_as_llama_cpp_expects(tmp_path):
    """The real Llama SentencePiece vocabulary (32,000 tokens) from llama.cpp's own tokenizer test files
    (``models/ggml-vocab-llama-spm.gguf`` with its ``.inp`` texts and the ``.out`` ids llama.cpp must give):
    transformers' tokenizer of it, saved without tokenizer.model, exported by our writer (scores rebuilt from the
    merges) tokenizes every test text to llama.cpp's expected ids, and as transformers does wherever the text
    does not start with whitespace (the known difference)."""
    import gguf as gguf_py
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amoeba_export.backends.gguf.reference import _value
    from amoeba_export.testing import tiny_llama_config

    models = SOURCE / "models"
    hf = tmp_path / "llama-spm"
    AutoTokenizer.from_pretrained(str(models), gguf_file="ggml-vocab-llama-spm.gguf").save_pretrained(hf)
    config = tiny_llama_config(vocab=32000, hidden=16, heads=2, kv_heads=1, intermediate=32, layers=1,
                               bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf)
    write_gguf(hf, tmp_path / "ours.gguf", dtype="F16", progress=False)

    reader = gguf_py.GGUFReader(str(models / "ggml-vocab-llama-spm.gguf"))
    ours = gguf_summary(tmp_path / "ours.gguf")["meta"]
    assert ours["tokenizer.ggml.tokens"] == _value(reader.fields["tokenizer.ggml.tokens"])
    real_types = _value(reader.fields["tokenizer.ggml.token_type"])
    assert [i for i, (a, b) in enumerate(zip(ours["tokenizer.ggml.token_type"], real_types)) if a != b] == [0]
    assert (real_types[0], ours["tokenizer.ggml.token_type"][0]) == (UNKNOWN, CONTROL)  # <unk> is an added token

    texts = (models / "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = [[int(x) for x in line.split()]
                for line in (models / "ggml-vocab-llama-spm.gguf.out").read_text().split("\n")][:len(texts)]
    runner = LlamaCppRunner(tmp_path / "ours.gguf", threads=1, n_ctx=512)
    try:
        got = [list(runner.llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts]
    finally:
        runner.close()
    assert len(texts) == 47 and got == expected
    visible = [i for i, t in enumerate(texts) if t and not t[0].isspace()]
    assert len(visible) >= 20
    assert [got[i] for i in visible] == hf_ids(hf, [texts[i] for i in visible])
