"""Reconstruction choices and default ridges, torch-free: the CLI's option parsers read them at ``--help``
time, and importing the solvers (``channels``, ``depth_maps``) would load torch for that."""

from __future__ import annotations

COMPENSATE_MODES = ("lstsq", "mean", "none")
# Ridge, relative to the mean variance of the kept channels: Σ_SS of up to 1,536 channels estimated from a few
# thousand tokens has small, noisy eigenvalues. On SmolLM2-135M (width 0.5 uniform, 4,096-token covariances)
# held-out perplexity is flat from 1e-4 to 1e-2 (189.2 / 189.5 / 189.6) and rises at 1e-1 (277.9).
DEFAULT_RIDGE = 1e-3
# Relative to the mean of diag(MᵀM); MLP outputs of a 576-wide model over a few thousand tokens are well
# conditioned, so this only guards against a degenerate (e.g. all-zero) direction.
DEFAULT_DEPTH_RIDGE = 1e-4
