"""Training rows: packed plain text or Alpaca-style instructions (loss on the response only).

Every row is ``seq_len`` tokens with a loss mask (``mask[t] = 1``: token t is a target). Rows of one step
are a pure function of (seed, step, rank), so resuming needs only the step counter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import chunks, split_tokens, text_file_tokens
from ..errors import DataError
from .config import TrainConfig

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclass(frozen=True)
class TrainRows:
    ids: torch.Tensor  # [n, seq_len] long
    mask: torch.Tensor  # [n, seq_len] bool
    source: str

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, step: int, rank: int, world: int, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
        """Rows of ``rank`` at ``step``: a fresh seeded permutation per epoch, sliced by global position."""
        n, global_batch = len(self), batch_size * world
        idx = []
        for j in range(batch_size):
            pos = step * global_batch + rank * batch_size + j
            epoch, k = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            idx.append(int(perm[k]))
        return self.ids[idx], self.mask[idx]


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})", fix="convert it to UTF-8") from exc
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{n}: invalid JSON ({exc.args[0][:60]})",
                            fix="write one JSON object per line") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: not a JSON object", fix="write one JSON object per line")
        records.append(rec)
    if not records:
        raise DataError(f"{path} holds no records", fix="pass a non-empty JSONL file")
    return records


def detect_format(path: Path) -> str:
    if path.suffix != ".jsonl":
        return "text"
    first = _read_jsonl(path)[0]
    return "alpaca" if "instruction" in first and "output" in first else "text"


def alpaca_rows(path: Path, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids_rows, mask_rows = [], []
    for n, rec in enumerate(_read_jsonl(path), 1):
        bad = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
        if bad or not isinstance(rec.get("input", ""), str):
            raise DataError(f"{path}:{n}: needs string fields 'instruction' and 'output' (and optional 'input')",
                            fix="write Alpaca records: {\"instruction\": ..., \"input\": ..., \"output\": ...}")
        extra = rec.get("input", "").strip()
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=rec["instruction"].strip(), input_block=f"### Input:\n{extra}\n\n" if extra else "")
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (p + r)[:seq_len]
        mask = ([0] * len(p) + [1] * len(r))[:seq_len]
        if sum(mask) == 0:
            continue  # the prompt alone fills seq_len: nothing to learn from this record
        pad = seq_len - len(ids)
        ids_rows.append(ids + [eos] * pad)  # right padding is invisible to earlier tokens (causal)
        mask_rows.append(mask + [0] * pad)
    if not ids_rows:
        raise DataError(f"{path}: every prompt is longer than seq_len={seq_len}", fix="raise --seq-len")
    return torch.tensor(ids_rows, dtype=torch.long), torch.tensor(mask_rows, dtype=torch.bool)


def load_train_rows(config: TrainConfig, tokenizer) -> TrainRows:
    """The rows a run trains on; any bad file raises DataError before anything is written."""
    seq = config.seq_len
    if not config.data_files:
        ids = chunks(split_tokens("train", tokenizer), seq, config.max_train_tokens)
        return TrainRows(ids, torch.ones_like(ids, dtype=torch.bool), "split:train")
    id_parts, mask_parts, text_streams = [], [], []
    for name in config.data_files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data file {path} not found", fix="pass existing .txt/.jsonl files")
        fmt = config.data_format if config.data_format != "auto" else detect_format(path)
        if fmt == "alpaca":
            if path.suffix != ".jsonl":
                raise DataError(f"{path}: Alpaca data must be a .jsonl file", fix="convert it to JSONL")
            ids, mask = alpaca_rows(path, tokenizer, seq)
            id_parts.append(ids)
            mask_parts.append(mask)
        else:
            text_streams.append(text_file_tokens(path, tokenizer))
    if text_streams:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        joined = torch.cat([torch.cat([t, torch.tensor([eos])]) for t in text_streams])
        ids = chunks(joined, seq, config.max_train_tokens)
        id_parts.append(ids)
        mask_parts.append(torch.ones_like(ids, dtype=torch.bool))
    ids, mask = torch.cat(id_parts), torch.cat(mask_parts)
    if config.max_train_tokens is not None:
        keep = max(1, config.max_train_tokens // seq)
        ids, mask = ids[:keep], mask[:keep]
    return TrainRows(ids, mask, "files:" + ",".join(config.data_files))
