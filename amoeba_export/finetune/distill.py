"""In-place distillation with sandwich sampling and loss-magnitude balancing.

Each step runs K shapes: the largest (ground-truth cross-entropy), the smallest and K−2 random shapes of
the plan (soft cross-entropy against the largest's detached logits). Losses are token sums normalised by
the *global* token count, and the balancing factors use globally reduced values, so N processes with
batch b compute exactly the gradient of one process with batch N·b.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from ..shape import Shape

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes


@dataclass(frozen=True)
class ShapeSpace:
    """The shapes training samples from: the largest, the smallest and a grid of named others."""

    largest: Shape
    smallest: Shape
    others: tuple[Shape, ...]

    @classmethod
    def from_plan(cls, plan, mode: str = "global") -> ShapeSpace:
        depths, ratios = sorted(plan.depth_table), sorted(plan.width_ratios)
        largest = plan.shape(depths[-1], ratios[-1], mode)
        smallest = plan.shape(depths[0], ratios[0], mode)
        others = tuple(plan.shape(d, w, mode) for d in depths for w in ratios
                       if (d, w) not in ((depths[-1], ratios[-1]), (depths[0], ratios[0])))
        return cls(largest, smallest, others)

    def __post_init__(self) -> None:
        if self.largest == self.smallest:
            raise ShapeError("the plan offers a single shape; nothing to make elastic",
                             fix="plan with more than one depth or width ratio")


class SandwichSampler:
    """Shapes of step ``s``: a pure function of (seed, s), so resuming needs no hidden state."""

    def __init__(self, space: ShapeSpace, k: int, seed: int) -> None:
        self.space, self.k, self.seed = space, k, seed

    def rng(self, step: int) -> random.Random:
        return random.Random(f"sandwich:{self.seed}:{step}")

    def shapes(self, step: int) -> list[Shape]:
        n_random = self.k - 2
        others = list(self.space.others)
        rng = self.rng(step)
        # Without replacement within a step (as the authors sample widths); with replacement if too few.
        picks = rng.sample(others, n_random) if n_random <= len(others) else rng.choices(others, k=n_random)
        return [self.space.largest, self.space.smallest, *picks]

    def state(self, step: int) -> dict:
        return {"kind": "sandwich", "seed": self.seed, "k": self.k, "next_step": step}


def token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 teacher: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Summed next-token loss: hard CE on ``ids`` (no teacher) or soft CE against ``teacher`` logits,
    ×T² so gradients keep their scale across temperatures. ``mask[b, t]`` = token t is a target."""
    pred = logits[:, :-1].float()
    keep = mask[:, 1:].to(pred.dtype)
    if teacher is None:
        ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return (ce.view_as(keep) * keep).sum()
    t = temperature
    p_teacher = torch.softmax(teacher[:, :-1].float() / t, dim=-1)
    soft = -(p_teacher * torch.log_softmax(pred / t, dim=-1)).sum(-1) * (t * t)
    return (soft * keep).sum()


def balance(losses: Sequence[torch.Tensor], magnitudes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``Lᵢ · L₁.detach() / Lᵢ.detach()`` (L₁ = the largest's loss): every shape gets the largest's
    magnitude while keeping its own gradient direction. ``magnitudes`` are the (global) detached values."""
    ref = magnitudes[0]
    out = [losses[0]]
    for loss, mag in zip(losses[1:], magnitudes[1:]):
        out.append(loss * (ref / mag.clamp_min(1e-12)))
    return out


@dataclass
class StepLosses:
    total: torch.Tensor  # what backward() sees on this process
    per_shape: list[float]  # global mean loss of each shape (before balancing)


def distill_step_losses(logits: Sequence[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, *,
                        temperature: float, balance_losses: bool, world_size: int = 1,
                        reduce: Reduce | None = None, teacher: torch.Tensor | None = None) -> StepLosses:
    """Loss of one sandwich step; ``logits[0]`` is the largest shape (the teacher), unless ``teacher`` (logits from
    elsewhere: the frozen base model's full shape under QAT's ``qat_teacher="base"``) is given: then every shape,
    the largest included, is distilled from it."""
    reduce = reduce or (lambda t: t)
    if teacher is None:
        teacher = logits[0].detach()
        sums = [token_losses(logits[0], ids, mask)]
        sums += [token_losses(lg, ids, mask, teacher, temperature) for lg in logits[1:]]
    else:
        sums = [token_losses(lg, ids, mask, teacher.detach(), temperature) for lg in logits]
    count = reduce(mask[:, 1:].sum().to(torch.float64).reshape(1))[0].clamp_min(1)
    # Gradients are averaged over processes, hence ×world_size: the mean over processes is the global mean.
    local = [s * (world_size / count).to(s.dtype) for s in sums]
    global_means = (reduce(torch.stack([s.detach().to(torch.float64) for s in sums])) / count).to(sums[0].dtype)
    mags = list(global_means.unbind(0))
    parts = balance(local, mags) if balance_losses else local
    return StepLosses(total=torch.stack(parts).sum(), per_shape=[float(m) for m in mags])
