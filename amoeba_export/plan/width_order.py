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
16 at a time ≈ 1 s.

Attention is ordered the same way in whole units (a GQA slot's channels in every KV group), with the block
cost ``tr(W_B [H⁻¹]_BB⁻¹ W_Bᵀ)``.
"""

from __future__ import annotations

import torch


def refit_order(weight: torch.Tensor, covariance: torch.Tensor, *, ridge: float, unit: int = 1,
                chunk: int = 16) -> torch.Tensor:
    """A permutation of ``weight``'s input channels, most important first, by greedy least-squares elimination.

    ``weight`` [out, in] and ``covariance`` [in, in] in the same channel order; ``unit``: channels per unit of
    width (removed together, contiguous); ``chunk``: units removed per step. Float64 throughout."""
    n = covariance.shape[0]
    if n % unit:
        raise ValueError(f"{n} channels are not whole units of {unit}")
    units = n // unit
    w = weight.double().clone()
    h = covariance.double().clone()
    h.diagonal().add_(ridge * float(h.diagonal().mean().clamp_min(1e-12)))
    hinv = torch.linalg.inv(h)
    alive = torch.ones(units, dtype=torch.bool)
    removed: list[int] = []
    while int(alive.sum()) > 1:
        idx = alive.nonzero().squeeze(1)
        cost = _unit_costs(w, hinv, idx, unit)
        take = idx[torch.argsort(cost, stable=True)[: min(chunk if unit == 1 else 1, len(idx) - 1)]]
        channels = (take[:, None] * unit + torch.arange(unit)).reshape(-1)
        block_inv = torch.linalg.inv(hinv[channels][:, channels])
        rows = hinv[channels]  # [removed, n]
        w -= w[:, channels] @ block_inv @ rows
        hinv -= rows.T @ block_inv @ rows
        w[:, channels] = 0
        hinv[channels] = 0
        hinv[:, channels] = 0
        hinv[channels, channels] = 1.0  # dead channels: a unit diagonal keeps later block inverses defined
        alive[take] = False
        removed += take.tolist()  # cheapest first: reversed below, it ends up last
    order = alive.nonzero().squeeze(1).tolist() + removed[::-1]
    return (torch.tensor(order)[:, None] * unit + torch.arange(unit)).reshape(-1)


def _unit_costs(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor, unit: int) -> torch.Tensor:
    """Δ of dropping each unit in ``idx`` (and refitting the rest)."""
    if unit == 1:
        return (w[:, idx] ** 2).sum(0) / hinv.diagonal()[idx]
    out = torch.empty(len(idx), dtype=w.dtype)
    for k, u in enumerate(idx.tolist()):
        s = slice(u * unit, (u + 1) * unit)
        wb = w[:, s]
        out[k] = torch.trace(wb @ torch.linalg.solve(hinv[s, s], wb.T))
    return out
