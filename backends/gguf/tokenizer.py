"""The HF tokenizer as GGUF metadata, so llama.cpp tokenizes exactly as transformers does.

Supported: byte-level BPE (``tokenizer.ggml.model = gpt2``: GPT-2, SmolLM2, Llama 3, Qwen2 style). The
pre-tokenizer name llama.cpp needs is looked up from the tokenizer.json's pre-tokenizer structure in
``pretokenizers.json``; an unlisted structure is an error unless the caller names the pre-tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amoeba_export.errors import BackendError

PRETOKENIZER_TABLE = Path(__file__).with_name("pretokenizers.json")

# llama.cpp token types (gguf.TokenType values)
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


@dataclass(frozen=True)
class GGUFVocab:
    model: str
    pre: str
    tokens: list[str] = field(repr=False)
    token_types: list[int] = field(repr=False)
    merges: list[str] = field(repr=False)
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None = field(default=None, repr=False)

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _matches(pattern: Any, value: Any) -> bool:
    """``pattern`` matches when every key it lists has an equal value in ``value`` (lists element by element)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _matches(v, value[k]) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and len(pattern) == len(value) and all(map(_matches, pattern, value))
    return pattern == value


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    table = json.loads(PRETOKENIZER_TABLE.read_text())["byte_level_bpe"]
    for entry in table:
        if (_matches(entry["pre_tokenizer"], tokenizer_json.get("pre_tokenizer"))
                and _matches(entry["normalizer"], tokenizer_json.get("normalizer"))):
            return entry["pre"]
    return None


def build_vocab(hf_dir: str | Path, vocab_size: int, *, pre_tokenizer: str | None = None) -> GGUFVocab:
    """GGUF tokenizer metadata of the HF folder's tokenizer, padded to the model's ``vocab_size`` rows."""
    from amoeba_export.modelio import load_tokenizer

    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        raise BackendError(f"{hf_dir} has no tokenizer.json; the GGUF backend embeds a fast (tokenizers) tokenizer",
                           fix="save the tokenizer with save_pretrained from a fast tokenizer")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BackendError(f"tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) "
                           "is not supported; the GGUF backend embeds byte-level BPE tokenizers only",
                           fix="export with the onnx or executorch backend, which use the HF tokenizer")
    pre = pre_tokenizer or detect_pre_tokenizer(data)
    if pre is None:
        known = ", ".join(e["pre"] for e in json.loads(PRETOKENIZER_TABLE.read_text())["byte_level_bpe"])
        raise BackendError(f"unknown pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]} (known: {known})",
                           fix="pass pre_tokenizer=<llama.cpp name> and check tokenizer_match in validation")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, NORMAL)
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(tokens) >= vocab_size:
        raise BackendError(f"the tokenizer has ids up to {max(tokens)} but the model only {vocab_size} rows",
                           fix="export a model whose embedding covers its tokenizer")
    # Rows beyond the tokenizer (embedding padded for speed) get placeholder names llama.cpp never emits.
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok = load_tokenizer(hf_dir)
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{kind}_token_id", None)
        if token_id is not None:
            special[kind] = int(token_id)
    # What the HF tokenizer's post-processor adds decides add_bos/add_eos, not a config flag that may be stale.
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    add_bos = "bos" in special and len(full) > len(plain) and full[0] == special["bos"]
    add_eos = "eos" in special and len(full) > len(plain) and full[-1] == special["eos"]
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return GGUFVocab("gpt2", pre, token_list, type_list, merges, special, add_bos, add_eos, template)
