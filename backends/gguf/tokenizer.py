"""The HF tokenizer as GGUF metadata, so llama.cpp tokenizes exactly as transformers does.

Which llama.cpp tokenizer a folder gets is the table :data:`TOKENIZER_KINDS`, keyed by the tokenizer.json
model (type, byte fallback):

- byte-level BPE (``tokenizer.ggml.model = gpt2``: GPT-2, SmolLM2, Llama 3, Qwen2 style): tokens, types and
  merges; the pre-tokenizer name llama.cpp needs is looked up from the tokenizer.json's pre-tokenizer structure
  in ``pretokenizers.json`` (``byte_level_bpe``); an unlisted structure is an error unless the caller names it.
- SentencePiece-style BPE with byte fallback (``tokenizer.ggml.model = llama``: Llama 2, Mistral): tokens,
  scores and types (normal, unknown, control, user-defined, byte). llama.cpp merges the adjacent pair whose
  concatenation has the highest score, as SentencePiece's BPE does. Scores come from ``tokenizer.model`` when the
  folder has one (and ``sentencepiece`` is installed), else from tokenizer.json's merges: a piece's score is minus
  the rank of the first merge that makes it, which is the SentencePiece model's own score for a tokenizer.json
  converted from one (llama.cpp's converter writes -1000 for every token in that case, so its tokenizer merges
  left to right). ``add_space_prefix`` is looked up from the structure of the tokenizer transformers loads in
  ``pretokenizers.json`` (``sentencepiece``).

In both, tokens the HF tokenizer added are control tokens when special, else user-defined, and the special
ids and add_bos/add_eos flags are what the HF tokenizer does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amoeba_export.errors import BackendError

PRETOKENIZER_TABLE = Path(__file__).with_name("pretokenizers.json")

# llama.cpp token types (gguf.TokenType values; SentencePiece's piece types use the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_SCORE = -1000.0  # score of a token the HF tokenizer added (never merged into: it is matched whole)
PAD_SCORE = -10000.0  # score of an embedding row beyond the tokenizer
SPM_SPACE = "\u2581"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
EXPORT_FIX = "export with the onnx or executorch backend, which use the HF tokenizer"


@dataclass(frozen=True)
class TokenizerKind:
    """One tokenizer family llama.cpp can run: its ``tokenizer.ggml.model`` and its pretokenizers.json section."""

    name: str
    ggml_model: str
    table: str


# (tokenizer.json model type, byte_fallback) -> the llama.cpp tokenizer it becomes.
TOKENIZER_KINDS: dict[tuple[str, bool], TokenizerKind] = {
    ("BPE", False): TokenizerKind("byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2)", "gpt2", "byte_level_bpe"),
    ("BPE", True): TokenizerKind("SentencePiece-style BPE with byte fallback (Llama 2, Mistral)", "llama",
                                 "sentencepiece"),
}
# SentencePiece model types (trainer_spec.model_type) -> whether llama.cpp's "llama" tokenizer reproduces them.
SPM_MODEL_TYPES: dict[int, tuple[str, bool]] = {1: ("UNIGRAM", False), 2: ("BPE", True), 3: ("WORD", False),
                                                4: ("CHAR", False)}


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
    scores: list[float] | None = field(default=None, repr=False)  # SentencePiece-style only
    add_space_prefix: bool | None = None  # SentencePiece-style only
    source: str = "tokenizer.json"  # where tokens and scores were read (for notes and tests)
    notes: tuple[str, ...] = ()  # what users of the file should know about its tokenizer (the export's notes)

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _matches(pattern: Any, value: Any) -> bool:
    """``pattern`` matches when every key it lists has an equal value in ``value`` (lists element by element)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _matches(v, value[k]) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and len(pattern) == len(value) and all(map(_matches, pattern, value))
    return pattern == value


def _table(section: str) -> list[dict[str, Any]]:
    return json.loads(PRETOKENIZER_TABLE.read_text())[section]


def _lookup(section: str, tokenizer_json: dict[str, Any]) -> dict[str, Any] | None:
    """The first pretokenizers.json entry of ``section`` whose pre-tokenizer and normalizer match."""
    for entry in _table(section):
        if (_matches(entry["pre_tokenizer"], tokenizer_json.get("pre_tokenizer"))
                and _matches(entry["normalizer"], tokenizer_json.get("normalizer"))):
            return entry
    return None


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    entry = _lookup("byte_level_bpe", tokenizer_json)
    return None if entry is None else entry["pre"]


def tokenizer_kind(model: dict[str, Any]) -> TokenizerKind:
    """The :data:`TOKENIZER_KINDS` entry of a tokenizer.json ``model``; raises BackendError quoting the table."""
    kind = TOKENIZER_KINDS.get((model.get("type"), bool(model.get("byte_fallback"))))
    if kind is None:
        supported = "; ".join(k.name for k in TOKENIZER_KINDS.values())
        raise BackendError(f"tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) "
                           f"is not supported by the GGUF backend; supported are: {supported}", fix=EXPORT_FIX)
    return kind


def build_vocab(hf_dir: str | Path, vocab_size: int, *, pre_tokenizer: str | None = None) -> GGUFVocab:
    """GGUF tokenizer metadata of the HF folder's tokenizer, padded to the model's ``vocab_size`` rows."""
    from amoeba_export.modelio import load_tokenizer

    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        raise BackendError(f"{hf_dir} has no tokenizer.json; the GGUF backend embeds a fast (tokenizers) tokenizer",
                           fix="save the tokenizer with save_pretrained from a fast tokenizer")
    data = json.loads(path.read_text())
    kind = tokenizer_kind(data.get("model", {}))
    tok = load_tokenizer(hf_dir)
    if kind.ggml_model == "llama":
        return _sentencepiece_vocab(Path(hf_dir), tok, vocab_size, pre_tokenizer)
    return _byte_level_vocab(data, tok, vocab_size, pre_tokenizer)


def _byte_level_vocab(data: dict[str, Any], tok, vocab_size: int, pre_tokenizer: str | None) -> GGUFVocab:
    model = data["model"]
    pre = pre_tokenizer or detect_pre_tokenizer(data)
    if pre is None:
        known = ", ".join(e["pre"] for e in _table("byte_level_bpe"))
        raise BackendError(f"unknown pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]} (known: {known})",
                           fix="pass pre_tokenizer=<llama.cpp name> and check tokenizer_match in validation")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, NORMAL)
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    _check_covered(max(tokens), vocab_size)
    # Rows beyond the tokenizer (embedding padded for speed) get placeholder names llama.cpp never emits.
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special, add_bos, add_eos, template = _special_tokens(tok)
    return GGUFVocab("gpt2", pre, token_list, type_list, merges, special, add_bos, add_eos, template)


def _check_covered(max_id: int, vocab_size: int) -> None:
    if max_id >= vocab_size:
        raise BackendError(f"the tokenizer has ids up to {max_id} but the model only {vocab_size} rows",
                           fix="export a model whose embedding covers its tokenizer")


def _special_tokens(tok) -> tuple[dict[str, int], bool, bool, str | None]:
    """Special ids, add_bos, add_eos and the chat template, as the HF tokenizer has them."""
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
    return special, add_bos, add_eos, template


@dataclass
class _Pieces:
    """Token text, score and type per id, as a SentencePiece model has them."""

    tokens: dict[int, str] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    types: dict[int, int] = field(default_factory=dict)

    def set(self, token_id: int, text: str, score: float, token_type: int) -> None:
        self.tokens[token_id], self.scores[token_id], self.types[token_id] = text, score, token_type


def _sentencepiece_vocab(hf_dir: Path, tok, vocab_size: int, pre_tokenizer: str | None) -> GGUFVocab:
    if pre_tokenizer not in (None, "default"):
        raise BackendError(f"pre_tokenizer {pre_tokenizer!r} does not apply to a SentencePiece-style tokenizer "
                           "(llama.cpp runs it with its 'default' pre-tokenizer)", fix="leave pre_tokenizer unset")
    # The tokenizer transformers runs, not the file: transformers 5's LlamaTokenizer rebuilds its normalizer and
    # pre-tokenizer (Metaspace) whatever tokenizer.json says.
    live = json.loads(tok.backend_tokenizer.to_str())
    entry = _lookup("sentencepiece", live)
    if entry is None:
        known = "; ".join(e["models"] for e in _table("sentencepiece"))
        raise BackendError(f"SentencePiece-style tokenizer with normalizer {json.dumps(live.get('normalizer'))[:160]} "
                           f"and pre-tokenizer {json.dumps(live.get('pre_tokenizer'))[:160]} is not one llama.cpp "
                           f"reproduces; supported are: {known}", fix=EXPORT_FIX)
    hf_vocab: dict[str, int] = live["model"]["vocab"]
    added: list[dict[str, Any]] = live.get("added_tokens", [])
    spm_file = hf_dir / "tokenizer.model"
    pieces = _read_sentencepiece(spm_file, hf_vocab) if spm_file.is_file() else None
    if pieces is not None:
        source = "tokenizer.model"
        # Tokens the HF side records as added (where llama.cpp's converter reads them), plus those the
        # SentencePiece model does not have at that id (added after it was trained).
        overlay = _recorded_added_tokens(hf_dir) + [a for a in added if pieces.tokens.get(a["id"]) != a["content"]]
    else:
        source = "tokenizer.json"
        pieces = _pieces_from_merges(live["model"], hf_vocab, {int(a["id"]) for a in added})
        overlay = added
    for token in overlay:
        text = token["content"]
        token_type = CONTROL if token.get("special") else USER_DEFINED
        if token_type == USER_DEFINED:
            text = text.replace(SPM_SPACE, " ")  # llama.cpp matches user-defined tokens in the raw text
        pieces.set(int(token["id"]), text, ADDED_SCORE, token_type)
    _check_covered(max(pieces.tokens), vocab_size)
    special, add_bos, add_eos, template = _special_tokens(tok)
    return GGUFVocab(
        "llama", "default", [pieces.tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        [pieces.types.get(i, UNUSED) for i in range(vocab_size)], [], special, add_bos, add_eos, template,
        scores=[pieces.scores.get(i, PAD_SCORE) for i in range(vocab_size)],
        add_space_prefix=bool(entry["add_space_prefix"]), source=source,
        notes=(f"SentencePiece-style tokenizer (tokenizer.ggml.model llama, scores from {source}); "
               f"{entry['llama_cpp_differs']}; other text tokenizes alike",) if entry["llama_cpp_differs"] else ())


def _read_sentencepiece(path: Path, hf_vocab: dict[str, int]) -> _Pieces | None:
    """Pieces of a SentencePiece ``tokenizer.model`` (None when sentencepiece is not installed: the scores are then
    derived from tokenizer.json's merges); raises BackendError when llama.cpp cannot reproduce it or when it is
    not the vocabulary the HF tokenizer has."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise BackendError(f"cannot read {path}: {exc}", fix="remove the damaged tokenizer.model") from exc
    model_type, reproducible = SPM_MODEL_TYPES.get(proto.trainer_spec.model_type, ("unknown", False))
    if not reproducible:
        supported = ", ".join(name for name, ok in SPM_MODEL_TYPES.values() if ok)
        raise BackendError(f"{path} is a SentencePiece {model_type} model, which llama.cpp's tokenizer does not "
                           f"reproduce; supported are: {supported}", fix=EXPORT_FIX)
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise BackendError(f"{path} treats whitespace as a suffix; supported are: prefix whitespace (Llama 2, "
                           "Mistral)", fix=EXPORT_FIX)
    out = _Pieces()
    for token_id, piece in enumerate(proto.pieces):
        out.set(token_id, piece.piece, float(piece.score), int(piece.type) if int(piece.type) in
                (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL)
    hf_tokens = {i: t for t, i in hf_vocab.items()}
    stale = [f"id {i} is {out.tokens.get(i)!r} there, {hf_tokens.get(i)!r} in tokenizer.json"
             for i in sorted(set(out.tokens) | set(hf_tokens)) if out.tokens.get(i) != hf_tokens.get(i)]
    if stale:
        raise BackendError(f"{path} and the HF tokenizer disagree on {len(stale)} ids ({'; '.join(stale[:3])})",
                           fix="remove the stale tokenizer.model; the vocabulary is then read from tokenizer.json")
    return out


def _recorded_added_tokens(hf_dir: Path) -> list[dict[str, Any]]:
    """Added tokens as transformers 4 recorded them: tokenizer_config.json's added_tokens_decoder and
    added_tokens.json (the latter never special)."""
    out: list[dict[str, Any]] = []
    config = hf_dir / "tokenizer_config.json"
    if config.is_file():
        for token_id, token in json.loads(config.read_text()).get("added_tokens_decoder", {}).items():
            out.append({"id": int(token_id), "content": token["content"], "special": bool(token.get("special"))})
    added = hf_dir / "added_tokens.json"
    if added.is_file():
        out += [{"id": int(i), "content": t, "special": False} for t, i in json.loads(added.read_text()).items()]
    return out


def _pieces_from_merges(model: dict[str, Any], vocab: dict[str, int], added: set[int]) -> _Pieces:
    """SentencePiece pieces rebuilt from a byte-fallback BPE's vocabulary and merges: byte tokens (``<0x..>``)
    and the unknown token keep score 0; a merged piece scores minus the rank of its first merge, the other normal
    pieces follow in id order (``added`` ids, which the caller overwrites, left out). llama.cpp's highest-score-
    first merging then applies the merges in rank order."""
    rank: dict[str, int] = {}
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, len(rank))
    out = _Pieces()
    unmerged = len(rank)
    unk = model.get("unk_token")
    for text, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        if BYTE_PIECE.fullmatch(text):
            out.set(token_id, text, 0.0, BYTE)
        elif text == unk:
            out.set(token_id, text, 0.0, UNKNOWN)
        elif text in rank:
            out.set(token_id, text, -float(rank[text]), NORMAL)
        elif token_id not in added:
            out.set(token_id, text, -float(unmerged), NORMAL)
            unmerged += 1
    return out
