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


def test_spread_with_margins_reads_neither_end():
    import torch

    from amoeba_export.data import chunks

    stream = torch.arange(1000)
    rows = chunks(stream, 100, 300, spread=True, margins=True)
    # 700 unread tokens as four equal gaps of 175: before, between and after the three rows
    assert [int(r[0]) for r in rows] == [175, 450, 725]
    assert all((r[1:] - r[:-1] == 1).all() for r in rows)
    for budget in (100, 200, 900, 950, None):  # from one row to the whole stream: never an overlap
        starts = [int(r[0]) for r in chunks(stream, 100, budget, spread=True, margins=True)]
        assert all(b - a >= 100 for a, b in zip(starts, starts[1:])) and starts[-1] + 100 <= 1000
    # a budget of the whole stream reads all of it, from the start
    assert chunks(stream, 100, None, spread=True, margins=True).flatten().tolist() == list(range(1000))


def _offsets(stream, rows):
    """Where each row sits in ``stream`` (the first match; rows of real text are unique)."""
    out = []
    for row in rows:
        hits = [int(i) for i in (stream == row[0]).nonzero().flatten()
                if stream[int(i): int(i) + len(row)].equal(row)]
        assert hits, "a row that is not a window of the text"
        out.append(hits[0])
    return out


@pytest.mark.parametrize("seq_len,budget", [(64, 256), (512, 2048), (128, 128)])
def test_measurement_rows_are_spread_over_the_split(seq_len, budget):
    from amoeba_export.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    stream = data.split_tokens("heldout", tok)
    measured = data.measurement_rows("heldout", tok, seq_len, budget)
    assert measured.rows.shape == (budget // seq_len, seq_len) and measured.available == stream.numel()
    starts = _offsets(stream, measured.rows)
    # never alice29.txt's Gutenberg header: the first row starts well inside the split ...
    assert starts[0] >= (stream.numel() - budget) // (len(starts) + 1) > 0
    assert not measured.rows[0].equal(stream[:seq_len])
    # ... and rows sit at evenly spaced offsets over all of it (floored equal gaps differ by at most one token)
    steps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(steps, default=0) - min(steps, default=0) <= 1
    assert stream.numel() - (starts[-1] + seq_len) >= starts[0] - 1
    assert f"{budget:,} tokens of the held-out split" in measured.quote(12.5)
    assert measured.quote(12.5).startswith("perplexity 12.500 over")


def test_measurement_rows_of_a_user_file_and_of_one_source(tmp_path):
    from pathlib import Path

    from amoeba_export.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    words = " ".join(f"w{i}" for i in range(3000))
    (tmp_path / "mine.txt").write_text(words)
    measured = data.measurement_rows(Path(tmp_path / "mine.txt"), tok, 32, 64)
    stream = data.text_file_tokens(tmp_path / "mine.txt", tok)
    assert measured.text == str(tmp_path / "mine.txt") and 0 < _offsets(stream, measured.rows)[0]
    with pytest.raises(DataError, match="unknown text 'mine.txt'"):
        data.measurement_rows("mine.txt", tok, 32, 64)  # a file is passed as a Path, never guessed from a str

    plays = data.split_tokens("train", tok, source="shakespeare")
    assert 0 < plays.numel() < data.split_tokens("train", tok).numel()
    assert "Shakespeare" in data.measurement_rows("shakespeare", tok, 64, 128).text
    with pytest.raises(DataError, match="no 'nope' documents"):
        data.split_tokens("train", tok, source="nope")
