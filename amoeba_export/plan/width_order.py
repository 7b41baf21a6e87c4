"""Which channels a narrowed layer keeps, chosen for the least-squares refit that reconstructs it.

FLAP's fluctuation metric scores each input channel of ``o_proj``/``down_proj`` on its own. But extraction
refits the kept columns (``amoeba_export.reconstruct.channels``), so a channel whose contribution the others can
reproduce costs little to drop however large its own variance. Optimal Brain Surgeon's structured rule says
exactly what dropping a channel costs once the rest are refit: with ``H = Σ + λI`` over the kept channels (the
input covariance, ridge as in the refit) and ``W`` the refit weight,

    Δ_j = ||W[:, j]||² / [H⁻¹]_jj,

and after dropping ``j`` the refit is updated in closed form (``W ← W − W[:, j] [H⁻¹]_{j·} / [H⁻¹]_jj``,
``H⁻¹`` downdated likewise). Eliminating the cheapest channel again and again, from the full width down, gives
a *nested* order: every prefix is what the greedy elimination keeps at that width, which is what the elastic
model's prefix slicing needs. Channels go ``chunk`` at a time (the ``chunk`` cheapest by the current Δ, removed
together with the block form of the same update) — one at a time took ≈ 20 s per 1,536-wide layer on 2 cores,
16 at a time ≈ 1 s. Attention heads keep FLAP's order (the plan ranks GQA slots per KV group).
"""

from __future__ import annotations

import torch


def refit_order(weight: torch.Tensor, covariance: torch.Tensor, *, ridge: float, chunk: int = 16) -> torch.Tensor:
    """A permutation of ``weight``'s input channels, most important first, by greedy least-squares elimination.

    ``weight`` [out, in] and ``covariance`` [in, in] in the same channel order; ``chunk``: channels removed per
    step. Float64 throughout."""
    w = weight.double().clone()
    h = covariance.double().clone()
    h.diagonal().add_(ridge * float(h.diagonal().mean().clamp_min(1e-12)))
    hinv = torch.linalg.inv(h)
    alive = torch.ones(h.shape[0], dtype=torch.bool)
    removed: list[int] = []
    while int(alive.sum()) > 1:
        idx = alive.nonzero().squeeze(1)
        cost = (w[:, idx] ** 2).sum(0) / hinv.diagonal()[idx]
        take = idx[torch.argsort(cost, stable=True)[: min(chunk, len(idx) - 1)]]
        block_inv = torch.linalg.inv(hinv[take][:, take])
        rows = hinv[take]  # [removed, n]
        w -= w[:, take] @ block_inv @ rows
        hinv -= rows.T @ block_inv @ rows
        w[:, take] = 0
        hinv[take] = 0
        hinv[:, take] = 0
        hinv[take, take] = 1.0  # dead channels: a unit diagonal keeps later block inverses defined
        alive[take] = False
        removed += take.tolist()  # cheapest first: reversed below, it ends up last
    return torch.tensor(alive.nonzero().squeeze(1).tolist() + removed[::-1])
