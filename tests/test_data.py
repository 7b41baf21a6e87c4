"""The shipped corpus: deterministic, non-overlapping splits with recorded token counts."""

import json

import pytest

from amoeba_export import data
from amoeba_export.errors import DataError


@pytest.fixture(scope="module")
def splits():
    return {s: data.split_documents(s) for s in data.SPLITS}


def test_splits_are_disjoint_and_deterministic(splits):
    names = {s: {d["name"] for d in docs} for s, docs in splits.items()}
    assert not names["heldout"] & names["train"] and not names["heldout"] & names["calibration"]
    assert not names["train"] & names["calibration"]
    assert "canterbury/alice29.txt" in names["heldout"]
    assert [d["name"] for d in data.split_documents("train")] == [d["name"] for d in splits["train"]]


def test_no_long_line_shared_between_splits(splits):
    # Documents may quote one another; no line of 80+ characters may appear in two splits.
    lines = {s: {ln.strip() for d in docs for ln in d["text"].splitlines() if len(ln.strip()) >= 80}
             for s, docs in splits.items()}
    assert not lines["heldout"] & lines["train"]
    assert not lines["heldout"] & lines["calibration"]
    assert not lines["calibration"] & lines["train"]


def test_wiki_markup_is_stripped(splits):
    wiki = [d["text"] for docs in splits.values() for d in docs if d["name"].startswith("wikipedia/")]
    assert len(wiki) > 50
    text = "\n".join(wiki)
    assert "{{" not in text and "[[" not in text and "<ref" not in text


def test_token_counts_recorded():
    from amoeba_export.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = data.split_tokens("heldout", tok)
    meta = json.loads((data.cache_subdir("data", f"tokens-v{data.DATA_VERSION}-{data.tokenizer_fingerprint(tok)}")
                       / "meta.json").read_text())
    assert meta["tokens"]["heldout"] == ids.numel() > 10_000


def test_user_files(tmp_path):
    from amoeba_export.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("the cat sat on the mat " * 20)
    assert data.text_file_tokens(tmp_path / "a.txt", tok).numel() > 20
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\nnot json\n')
    with pytest.raises(DataError, match="b.jsonl:2"):
        data.text_file_tokens(tmp_path / "b.jsonl", tok)
    with pytest.raises(DataError, match="not found"):
        data.text_file_tokens(tmp_path / "missing.txt", tok)


def test_chunks_from_start_and_spread():
    import torch

    from amoeba_export.data import chunks

    stream = torch.arange(1000)
    assert chunks(stream, 100, 300).tolist() == [list(range(0, 100)), list(range(100, 200)),
                                                 list(range(200, 300))]
    spread = chunks(stream, 100, 300, spread=True)
    # first and last aligned window, one in the middle: rows cover the whole stream and never overlap
    assert [int(r[0]) for r in spread] == [0, 400, 900]
    assert all((r[1:] - r[:-1] == 1).all() for r in spread)
    assert chunks(stream, 100, None, spread=True).shape == (10, 100)
    with pytest.raises(DataError):
        chunks(stream[:50], 100, spread=True)
