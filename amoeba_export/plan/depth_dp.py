"""Depth by dynamic programming (AmoebaLLM): the best set of removed layers for every depth.

Layers are visited back to front. Entry (n, m) is the best set of m removed layers among the last n
candidates; its candidate is set(n−1, m−1) ∪ {layer N−n}, scored by one calibration evaluation and kept
if it beats set(n−1, m). Every candidate of step n leaves the layers before N−n untouched, so the hidden
states entering layer N−n are computed once and reused: an evaluation runs only the suffix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

# score(removed_layers, start_layer) -> lower is better; start_layer: all layers before it are kept.
ScoreFn = Callable[[frozenset[int], int], float]


@dataclass
class DepthSearch:
    """Result of a depth search: removed-layer sets by count, their scores, and the cost."""

    removed: dict[int, tuple[int, ...]]  # m -> removed layer indices
    scores: dict[int, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0

    def kept(self, num_layers: int) -> dict[int, tuple[int, ...]]:
        """depth -> kept layer indices."""
        return {num_layers - m: tuple(i for i in range(num_layers) if i not in set(r))
                for m, r in self.removed.items()}


def dp_layer_selection(candidates: Sequence[int], max_removed: int, score: ScoreFn, *,
                       full_score: float, progress: bool = True) -> DepthSearch:
    """Run the DP over ``candidates`` (ascending layer indices) for up to ``max_removed`` removals."""
    start = time.perf_counter()
    n_cand = len(candidates)
    max_removed = min(max_removed, n_cand)
    best: dict[int, tuple[frozenset[int], float]] = {0: (frozenset(), full_score)}
    evaluations = 0
    total = sum(min(n, max_removed) for n in range(1, n_cand + 1))
    bar = tqdm(total=total, desc="depth DP", disable=not progress)
    for n in range(1, n_cand + 1):
        layer = candidates[n_cand - n]
        current = {0: best[0]}
        for m in range(1, min(n, max_removed) + 1):
            removed = best[m - 1][0] | {layer}
            value = score(removed, layer)
            evaluations += 1
            bar.update(1)
            if m in best and best[m][1] <= value:
                current[m] = best[m]
            else:
                current[m] = (removed, value)
        best = current
        bar.set_postfix(layer=layer)
    bar.close()
    return DepthSearch(
        removed={m: tuple(sorted(s)) for m, (s, _) in best.items()},
        scores={m: v for m, (_, v) in best.items()},
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
    )


def brute_force_selection(candidates: Sequence[int], max_removed: int, score: ScoreFn) -> dict[int, float]:
    """Best achievable score for each removal count by trying every subset (tests only: exponential)."""
    from itertools import combinations

    out = {}
    for m in range(0, min(max_removed, len(candidates)) + 1):
        out[m] = min(score(frozenset(c), min(c) if c else candidates[-1] + 1)
                     for c in combinations(candidates, m))
    return out
