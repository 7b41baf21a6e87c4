import torch

from amoeba_export.plan.width_order import refit_order
from amoeba_export.reconstruct.channels import solve_refit


def _refit_error(w, cov, mean, order, kept, ridge):
    """Output error E||W x − (W_S' x_S + b)||² of the least-squares refit keeping ``order[:kept]``: with
    W_S' = W P, the residual is W (I − [P 0]) x on centred x (the bias takes the mean)."""
    p_cov = cov[order][:, order].double()
    refit = solve_refit(mean[order], p_cov, kept, ridge=ridge)
    r = torch.eye(len(order), dtype=torch.float64)
    r[:, :kept] -= refit.projection.double()
    w_p = w[:, order].double()
    return float(torch.trace(w_p @ r @ p_cov @ r.T @ w_p.T))


def test_diagonal_covariance_gives_flaps_order():
    """Uncorrelated inputs: nothing can stand in for a dropped channel, so its cost is FLAP's own metric
    Var(x_c)·||W[:, c]||² and the elimination order is FLAP's (chunked or not)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g)
    var = torch.rand(40, generator=g) * 3 + 0.1
    flap = (var * w.pow(2).sum(0)).argsort(descending=True)
    for chunk in (1, 4, 16):
        assert torch.equal(refit_order(w, torch.diag(var), ridge=0.0, chunk=chunk), flap)


def test_a_duplicated_channel_goes_first():
    """Two copies of the strongest input: FLAP keeps both at the top; the refit needs only one, since the kept
    copy reproduces the other exactly, so the elimination drops a copy before anything else."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 12, generator=g) * torch.linspace(0.5, 1.5, 12)
    x = torch.cat([x, x[:, :1]], 1)  # channel 12 = channel 0
    x[:, 0] *= 3
    x[:, 12] = x[:, 0]
    w = torch.randn(6, 13, generator=g)
    w[:, [0, 12]] *= 3
    cov = torch.cov(x.T.double())
    order = refit_order(w, cov, ridge=1e-6, chunk=1)
    assert set(order[:12].tolist()) & {0, 12} and order[12].item() in (0, 12)
    flap = (cov.diagonal() * w.double().pow(2).sum(0)).argsort(descending=True)
    assert {flap[0].item(), flap[1].item()} == {0, 12}


def test_order_is_a_permutation_and_beats_flap_on_correlated_inputs():
    """On correlated inputs the greedy order's refit error is below FLAP's order's at every width checked (here
    by 8–56 %; greedy elimination is not optimal in general, so this is a fixed case, checked, not assumed)."""
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(24, 24, generator=g)
    x = torch.randn(6000, 24, generator=g) @ mix
    w = torch.randn(10, 24, generator=g)
    cov = torch.cov(x.T.double())
    mean = x.double().mean(0)
    order = refit_order(w, cov, ridge=1e-6, chunk=1)
    assert torch.equal(order.sort().values, torch.arange(24))
    flap = (cov.diagonal() * w.double().pow(2).sum(0)).argsort(descending=True)
    for kept in (6, 12, 18):
        assert _refit_error(w, cov, mean, order, kept, 1e-6) < _refit_error(w, cov, mean, flap, kept, 1e-6)


def test_plan_keeps_channels_in_refit_order(tiny_plan_dir):
    """A plan's MLP order is a fixed point of the elimination: re-running it on the plan-ordered weights and
    covariances keeps every channel where it is (a plan that kept FLAP's order would move them)."""
    from amoeba_export.plan import Plan, load_elastic

    plan = Plan.load(tiny_plan_dir)
    assert plan.config.width_order == "refit"
    elastic, plan = load_elastic(tiny_plan_dir, plan=plan, compensate="none", depth_maps=False)
    for layer, block in enumerate(elastic.layers):
        order = refit_order(block.down_proj.weight.detach(), plan.covariances[layer].mlp.double(),
                            ridge=plan.config.width_ridge)
        assert torch.equal(order, torch.arange(len(order))), layer
