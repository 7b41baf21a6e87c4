import math
import random

import pytest

from amoeba_export.plan.depth_dp import brute_force_selection, dp_layer_selection


@pytest.mark.parametrize("seed", range(5))
def test_dp_equals_brute_force_on_six_layer_toy(seed):
    rng = random.Random(seed)
    cost = {layer: rng.uniform(0.01, 1.0) for layer in range(5)}  # 6 layers, the last always kept
    calls = []

    def score(removed, start):
        calls.append(start)
        assert all(layer >= start for layer in removed)  # prefix before `start` untouched
        return math.log1p(sum(cost[i] for i in removed))

    result = dp_layer_selection(list(range(5)), 4, score, full_score=0.0, progress=False)
    brute = brute_force_selection(list(range(5)), 4, score)
    for m in range(5):
        assert result.scores[m] == pytest.approx(brute[m])
        assert len(result.removed[m]) == m
    assert result.evaluations == sum(min(n, 4) for n in range(1, 6))


def test_kept_table_per_depth():
    result = dp_layer_selection([0, 1, 2], 2, lambda r, s: float(sum(r)), full_score=0.0, progress=False)
    kept = result.kept(4)
    assert kept[4] == (0, 1, 2, 3)
    assert kept[3] == (0, 1, 2, 3)[:0] + tuple(i for i in range(4) if i not in result.removed[1])
    assert result.removed[2] == (0, 1)
