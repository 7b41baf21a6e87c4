"""Least-squares width refit: exact where the algebra says it must be, better than the mean where it can be."""

import torch

from amoeba_export.reconstruct import LeastSquaresCompensation, MeanCompensation, solve_refit


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / x.shape[0]


def test_every_channel_kept_is_the_layer_itself():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(0)) + 3.0
    mean, cov = _moments(x)
    w = torch.randn(7, 12, dtype=torch.float64)
    refit = solve_refit(mean, cov, 12)
    torch.testing.assert_close(x.double() @ refit.weight(w, 12).T, x.double() @ w.T, atol=1e-5, rtol=0)
    assert refit.bias(w) is None


def test_removed_channels_that_kept_ones_explain_are_reproduced_exactly():
    """Removed inputs that are affine functions of kept inputs: the refit layer equals the full layer."""
    g = torch.Generator().manual_seed(1)
    kept = torch.randn(2000, 8, generator=g, dtype=torch.float64) * 2 + 0.5
    mix = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x = torch.cat([kept, kept @ mix + 1.5], dim=1)
    mean, cov = _moments(x)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    refit = solve_refit(mean, cov, 8, ridge=1e-12)
    got = x[:, :8] @ refit.weight(w, 8).T.double() + refit.bias(w).double()
    torch.testing.assert_close(got, x @ w.T, atol=1e-5, rtol=0)


def test_least_squares_beats_mean_compensation_on_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3000, 6, generator=g)
    x = torch.cat([base, base @ torch.randn(6, 10, generator=g) + 0.3 * torch.randn(3000, 10, generator=g)], 1)
    mean, cov = _moments(x)
    w = torch.randn(5, 16, generator=g)
    full = x @ w.T
    errors = {}
    for name, comp in (("mean", MeanCompensation(mean.float())),
                       ("lstsq", LeastSquaresCompensation(mean.float(), cov.float()))):
        refit = comp.refit(8)
        errors[name] = float(((x[:, :8] @ refit.weight(w, 8).T + refit.bias(w) - full) ** 2).mean())
    assert errors["lstsq"] < 0.1 * errors["mean"]
