"""Perplexity of any logits function over fixed, non-overlapping token rows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # [b, t] ids -> [b, t, vocab] logits


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count of ``[b, t, v]`` logits for ``[b, t]`` ids."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = ids[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, reduction="sum").item(), target.numel()


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, rows: torch.Tensor, *, batch_size: int = 1) -> float:
    """exp(mean NLL) over every predicted token of ``rows`` ([n, seq_len])."""
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start:start + batch_size]
        s, c = nll_sum(logits_fn(ids), ids)
        total, count = total + s, count + c
    return math.exp(total / count)


def hf_logits_fn(model) -> LogitsFn:
    """Logits function of a transformers causal LM (no cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits
