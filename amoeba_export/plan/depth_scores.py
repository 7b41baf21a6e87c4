"""What the depth DP minimises: calibration loss (default) or multiple-choice error.

Both are ``ScoreFn``s (``score(removed, start) -> float``, lower is better) that reuse the hidden states
entering layer ``start``: every candidate of DP step n keeps the layers before N−n, so the prefix is run
once per calibration batch, not once per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..elastic import ElasticLM, LayerWidth
from ..errors import DataError

# one multiple-choice question: (context ids, continuation ids) per choice, and the correct choices
Question = tuple[Sequence[tuple[list[int], list[int]]], frozenset[int]]


class _SuffixRunner:
    """The full-width model over a fixed batch, with the hidden states entering every layer cached."""

    def __init__(self, elastic: ElasticLM, rows: torch.Tensor) -> None:
        self.elastic, self.rows = elastic, rows
        d = elastic.dims
        self.full = LayerWidth(d.num_heads, d.num_kv_heads, d.intermediate_size)
        with torch.no_grad():
            h, self.pos = elastic.embed(rows)
            self.entering: list[torch.Tensor] = []
            for layer in range(d.num_layers):
                self.entering.append(h)
                h = elastic.layers[layer](h, self.pos, self.full)
        self.full_hidden = h

    @torch.no_grad()
    def hidden(self, removed: frozenset[int], start: int) -> torch.Tensor:
        h = self.entering[start]
        for layer in range(start, self.elastic.dims.num_layers):
            if layer not in removed:
                h = self.elastic.layers[layer](h, self.pos, self.full)
        return h


class SuffixPerplexity(_SuffixRunner):
    """Mean next-token cross-entropy on calibration rows (``full_loss``: nothing removed)."""

    def __init__(self, elastic: ElasticLM, rows: torch.Tensor) -> None:
        super().__init__(elastic, rows)
        self.full_loss = self._loss(self.full_hidden)

    def _loss(self, h: torch.Tensor) -> float:
        logits = self.elastic.head(h)
        pred = logits[:, :-1].reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(pred, self.rows[:, 1:].reshape(-1)).item()

    def __call__(self, removed: frozenset[int], start: int) -> float:
        return self._loss(self.hidden(removed, start))


class SuffixChoiceError(_SuffixRunner):
    """1 − multiple-choice accuracy, each choice scored by the summed log-probability of its tokens.

    ``items``: per question, the (context ids, continuation ids) of each choice and the set of correct
    choice indices. All sequences run as one right-padded batch: attention is causal, so the padding after
    a sequence never reaches its tokens. Ties between choices go to the first, as ``np.argmax`` does in
    ``evaluation.tasks.evaluate_mc``, so the DP and the task evaluation count the same answers.
    """

    def __init__(self, elastic: ElasticLM, items: Sequence[Question], *, pad_id: int = 0) -> None:
        if not items:
            raise DataError("the multiple-choice depth metric needs at least one question",
                            fix="pick a task with examples")
        seqs = [ctx + cont for choices, _ in items for ctx, cont in choices]
        if any(not ctx or not cont for choices, _ in items for ctx, cont in choices):
            raise DataError("every choice needs a non-empty context and continuation",
                            fix="give each prompt at least one token")
        width = max(map(len, seqs))
        rows = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        # position t predicts token t+1: the continuation's tokens are predicted from len(ctx)-1 on
        self.targets = torch.zeros(len(seqs), width - 1, dtype=torch.long)
        self.weights = torch.zeros(len(seqs), width - 1)
        for i, seq in enumerate(seqs):
            rows[i, : len(seq)] = torch.tensor(seq)
        i = 0
        self.groups: list[tuple[int, int, frozenset[int]]] = []
        for choices, correct in items:
            self.groups.append((i, len(choices), correct))
            for ctx, cont in choices:
                self.targets[i, len(ctx) - 1: len(ctx) - 1 + len(cont)] = torch.tensor(cont)
                self.weights[i, len(ctx) - 1: len(ctx) - 1 + len(cont)] = 1.0
                i += 1
        super().__init__(elastic, rows)
        self.full_loss = self._error(self.full_hidden)

    def choice_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each sequence's continuation (the head runs on those positions only)."""
        at = self.weights > 0
        logp = torch.log_softmax(self.elastic.head(h[:, :-1][at]).float(), dim=-1)
        picked = logp.gather(-1, self.targets[at].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(at.shape[0], dtype=picked.dtype)
        return sums.index_add_(0, at.nonzero()[:, 0], picked)

    def _error(self, h: torch.Tensor) -> float:
        scores = self.choice_logprobs(h)
        right = sum(int(int(scores[s: s + n].argmax()) in correct) for s, n, correct in self.groups)
        return 1.0 - right / len(self.groups)

    def __call__(self, removed: frozenset[int], start: int) -> float:
        return self._error(self.hidden(removed, start))
