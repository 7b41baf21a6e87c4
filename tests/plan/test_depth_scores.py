import pytest
import torch

from amoeba_export.elastic import make_elastic
from amoeba_export.errors import DataError
from amoeba_export.plan.depth_scores import SuffixChoiceError, SuffixPerplexity
from amoeba_export.shape import Shape
from amoeba_export.testing import tiny_llama

VOCAB = 320


def _subnet_logits(elastic, ids: torch.Tensor, removed: frozenset[int]) -> torch.Tensor:
    n = elastic.dims.num_layers
    kept = tuple(i for i in range(n) if i not in removed)
    d = elastic.dims
    shape = Shape(kept, (d.num_heads,) * len(kept), (d.num_kv_heads,) * len(kept), (d.intermediate_size,) * len(kept))
    with torch.no_grad():
        return elastic(ids, shape)


def test_suffix_perplexity_matches_a_full_forward():
    elastic = make_elastic(tiny_llama(layers=5))
    rows = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    scorer = SuffixPerplexity(elastic, rows)
    removed = frozenset({2, 3})
    logits = _subnet_logits(elastic, rows, removed)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1)).item()
    assert scorer(removed, 2) == pytest.approx(ref, abs=1e-5)
    assert scorer.full_loss == pytest.approx(scorer(frozenset(), 4), abs=1e-6)


def _questions(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in range(n):
        ctx = torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        choices = [(ctx, torch.randint(0, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),),
                                       generator=g).tolist()) for _ in range(2 + q % 3)]
        out.append((choices, frozenset({q % len(choices)})))
    return out


@pytest.mark.parametrize("removed,start", [(frozenset(), 4), (frozenset({1}), 1), (frozenset({0, 3}), 0)])
def test_choice_error_matches_unpadded_scoring(removed, start):
    """The padded batch gives each choice the log-likelihood an unpadded forward gives it."""
    elastic = make_elastic(tiny_llama(layers=5))
    items = _questions(0)
    scorer = SuffixChoiceError(elastic, items, pad_id=7)
    wrong = 0
    sums = scorer.choice_logprobs(scorer.hidden(removed, start))
    k = 0
    for choices, correct in items:
        ref = []
        for ctx, cont in choices:
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(_subnet_logits(elastic, ids, removed)[0, :-1], -1)
            ref.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            assert float(sums[k]) == pytest.approx(ref[-1], abs=1e-4)
            k += 1
        wrong += int(max(range(len(ref)), key=lambda i: (ref[i], -i)) not in correct)
    assert scorer(removed, start) == pytest.approx(wrong / len(items))


def test_choice_error_rejects_empty_input():
    elastic = make_elastic(tiny_llama(layers=2))
    with pytest.raises(DataError):
        SuffixChoiceError(elastic, [])
    with pytest.raises(DataError):
        SuffixChoiceError(elastic, [([([], [3])], frozenset({0}))])
