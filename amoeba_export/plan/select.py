"""Choosing among candidate shapes by measured calibration loss (knowledge preserved, not guessed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..elastic import ElasticLM
from ..evaluation.perplexity import perplexity
from ..shape import Shape


@torch.no_grad()
def rank_shapes(elastic: ElasticLM, shapes: Sequence[Shape], rows: torch.Tensor) -> list[tuple[float, Shape]]:
    """``(perplexity, shape)`` for every candidate, best first."""
    scored = []
    for shape in shapes:
        prepare = getattr(elastic, "merge_for_shape", None)
        if prepare is not None:
            prepare(shape)
        scored.append((perplexity(lambda ids, s=shape: elastic(ids, s), rows), shape))
    return sorted(scored, key=lambda item: item[0])
