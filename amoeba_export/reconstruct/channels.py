"""Width reconstruction: refit a projection's kept input channels by least squares.

When a layer is narrowed, ``o_proj`` and ``down_proj`` lose input channels. Their kept columns and a new output
bias are refit so that, over calibration inputs ``x``, the pruned projection reproduces the full one::

    minimise  E ||W x − (W_S' x_S + b)||²  +  λ ||W_S'||²

With ``x = μ + x̃`` and ``Σ = Cov(x)``, the optimal bias absorbs the mean, ``b = W μ − W_S' μ_S``, and what is
left is ridge regression on centred inputs: ``W_S' = W Σ_{·S} (Σ_SS + λI)⁻¹``. Both are *linear in W*:

    W_S' = W P,   b = W c,   with  P = Σ_{·S} (Σ_SS + λI)⁻¹  [in × kept],  c = μ − P μ_S  [in].

``(P, c)`` depend on the statistics only, so one solve per kept width serves the frozen weight, a LoRA-merged
one and a weight still being trained alike. FLAP's mean compensation is the special case ``P = [I; 0]``
(kept columns unchanged), ``c = [0; μ_removed]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .modes import COMPENSATE_MODES, DEFAULT_RIDGE  # noqa: F401  (torch-free home, so the CLI's --help reads it)


@dataclass(frozen=True)
class ChannelRefit:
    """How the kept columns and the output bias follow from the full weight ``W`` ([out, in])."""

    projection: torch.Tensor | None  # P [in, kept]; None: the kept columns stay W[:, :kept]
    offset: torch.Tensor | None  # c [in]; the extra output bias is W @ c

    def weight(self, w_full: torch.Tensor, kept: int) -> torch.Tensor:
        if self.projection is None:
            return w_full[:, :kept]
        return w_full @ self.projection.to(w_full.dtype)

    def bias(self, w_full: torch.Tensor) -> torch.Tensor | None:
        return None if self.offset is None else w_full @ self.offset.to(w_full.dtype)


class Compensator(Protocol):
    """Per projection: the refit for a kept prefix of ``kept`` input channels (importance order)."""

    def refit(self, kept: int) -> ChannelRefit: ...


@dataclass(frozen=True)
class MeanCompensation:
    """FLAP: the removed channels' mean contribution becomes an output bias; kept columns unchanged."""

    mean: torch.Tensor  # [in], importance order

    def refit(self, kept: int) -> ChannelRefit:
        offset = self.mean.clone()
        offset[:kept] = 0
        return ChannelRefit(None, offset)


@dataclass(frozen=True)
class LeastSquaresCompensation:
    """Least-squares refit of the kept columns plus bias, from the input's mean and covariance.

    ``covariance`` is a tensor or a function returning it: a plan passes a reader of gram.safetensors, so a
    shape that narrows no layer (a pure depth cut) never reads the ≈ 160 MB of covariances."""

    mean: torch.Tensor  # [in], importance order
    covariance: torch.Tensor | Callable[[], torch.Tensor]  # [in, in], importance order
    ridge: float = DEFAULT_RIDGE
    # One solve per kept width (global mode gives every layer its own); the statistics never change.
    _solved: dict[int, ChannelRefit] = field(default_factory=dict, repr=False, compare=False)

    def refit(self, kept: int) -> ChannelRefit:
        if kept not in self._solved:
            cov = self.covariance if isinstance(self.covariance, torch.Tensor) else self.covariance()
            self._solved[kept] = solve_refit(self.mean, cov, kept, ridge=self.ridge)
        return self._solved[kept]


def solve_refit(mean: torch.Tensor, covariance: torch.Tensor, kept: int, *, ridge: float = DEFAULT_RIDGE,
                ) -> ChannelRefit:
    """``P = Σ_{·S} (Σ_SS + λI)⁻¹`` and ``c = μ − P μ_S`` for the first ``kept`` channels, in float64.

    Keeping every channel needs no refit (``P = I``, ``c = 0``): that case returns the identity refit rather than
    a ridge-shrunk one, so a full-width layer is the original layer exactly."""
    n = covariance.shape[0]
    if kept >= n:
        return ChannelRefit(None, None)
    # Only Σ_{S·} enters the solve: converting just those rows to float64 (not the whole n × n matrix) saves a
    # copy per solve, and choosing a shape for a budget solves every narrowed layer of every candidate
    cov = covariance[:kept].double()
    mu = mean.double()
    s_s = cov[:, :kept].clone()
    lam = ridge * float(s_s.diagonal().mean().clamp_min(1e-12))
    s_s.diagonal().add_(lam)  # Σ_SS + λI, without building the identity
    chol = torch.linalg.cholesky(s_s)
    # (Σ_SS + λI) Pᵀ = Σ_{S·}  →  Pᵀ by one Cholesky solve (Σ is symmetric, so Σ_{S·} = Σ_{·S}ᵀ); measured faster
    # on CPU than forming the inverse (torch.cholesky_inverse is ≈ 20× slower at 768 × 768)
    p = torch.cholesky_solve(cov, chol).T.contiguous()
    offset = mu - p @ mu[:kept]
    return ChannelRefit(p.float(), offset.float())


@dataclass(frozen=True)
class LayerCovariance:
    """Input covariances of one layer's ``o_proj`` and ``down_proj`` (float32, the plan's importance order)."""

    attn: torch.Tensor
    mlp: torch.Tensor


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row (half the bytes on disk)."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return matrix[rows, cols].contiguous()


def unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(n, n)
    out = torch.empty(n, n, dtype=packed.dtype)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out
