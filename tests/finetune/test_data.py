import json

import pytest

from amoeba_export.errors import DataError
from amoeba_export.finetune.config import TrainConfig
from amoeba_export.finetune.data import load_train_rows
from amoeba_export.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _alpaca(tmp_path, records):
    p = tmp_path / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_alpaca_loss_is_on_the_response_only(tmp_path, tok):
    p = _alpaca(tmp_path, [{"instruction": "say hello", "input": "", "output": "hello tiny world!"},
                           {"instruction": "copy", "input": "the cat sat", "output": "the cat sat"}])
    rows = load_train_rows(TrainConfig(seq_len=512, data_files=(str(p),)), tok)
    assert len(rows) == 2
    ids, mask = rows.ids[0], rows.mask[0]
    response = tok("hello tiny world!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kept = ids[mask].tolist()
    assert kept == response
    first = int(mask.nonzero()[0])
    assert tok.decode(ids[:first]).endswith("### Response:\n")


def test_text_files_are_packed(tmp_path, tok):
    p = tmp_path / "a.txt"
    p.write_text("the cat sat on the mat. " * 50)
    rows = load_train_rows(TrainConfig(seq_len=16, data_files=(str(p),)), tok)
    assert rows.ids.shape[1] == 16 and bool(rows.mask.all())


@pytest.mark.parametrize("content, match", [
    ('{"instruction": "x", "output": "y"}\n{not json\n', r"alpaca.jsonl:2: invalid JSON"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', r"alpaca.jsonl:2: needs string fields"),
    ("", "holds no records"),
])
def test_bad_files_raise_data_error_with_the_line(tmp_path, tok, content, match):
    p = tmp_path / "alpaca.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_train_rows(TrainConfig(seq_len=32, data_files=(str(p),), data_format="alpaca"), tok)


def test_missing_and_binary_files(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        load_train_rows(TrainConfig(data_files=(str(tmp_path / "nope.txt"),)), tok)
    p = tmp_path / "b.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_train_rows(TrainConfig(data_files=(str(p),)), tok)
