"""Choosing among candidate shapes by measured calibration loss (knowledge preserved, not guessed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..elastic import ElasticLM
from ..evaluation.perplexity import perplexity
from ..shape import Shape

# Tokens per forward while ranking. A narrowed layer forms its refit weight (W·P, see reconstruct.channels) once
# per forward, so one forward over all of pick_for_params' 512 calibration tokens (two rows) forms it once per
# candidate rather than once per row: half the W·P time (6.6 → 3.2 s of a 50 % pick on SmolLM2-135M), and fewer,
# larger matmuls. The cap bounds the logits' memory (a 152k vocabulary: 1.2 GB of float32 logits at 2,048 tokens).
RANK_BATCH_TOKENS = 2048


@torch.no_grad()
def rank_shapes(elastic: ElasticLM, shapes: Sequence[Shape], rows: torch.Tensor) -> list[tuple[float, Shape]]:
    """``(perplexity, shape)`` for every candidate, best first."""
    batch_size = max(1, RANK_BATCH_TOKENS // rows.shape[1])
    scored = []
    for shape in shapes:
        prepare = getattr(elastic, "merge_for_shape", None)
        if prepare is not None:
            prepare(shape)
        scored.append((perplexity(lambda ids, s=shape: elastic(ids, s), rows, batch_size=batch_size), shape))
    return sorted(scored, key=lambda item: item[0])
