import torch

from amoeba_export.finetune.distill import SandwichSampler, ShapeSpace, balance, distill_step_losses
from amoeba_export.plan import Plan


def test_balancing_rescales_to_the_largest_magnitude_and_keeps_direction():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    l1, l2 = (w ** 2).sum(), 10 * w.sum()  # magnitudes 5 and 30
    out = balance([l1, l2], [l1.detach(), l2.detach()])
    assert torch.allclose(out[1], l1.detach())  # value: L1
    (g,) = torch.autograd.grad(out[1], w)
    assert torch.allclose(g, torch.full((2,), 10.0) * 5 / 30)  # ∇L2 · L1/L2
    (g1,) = torch.autograd.grad(out[0], w)
    assert torch.allclose(g1, 2 * w.detach())  # the largest is untouched


def test_balance_switch_changes_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    base = [torch.randn(2, 5, 7) for _ in range(3)]  # drawn once: both runs see the same logits
    grads = []
    for on in (True, False):
        logits = [base[i] + w[i] for i in range(3)]
        res = distill_step_losses(logits, ids, mask, temperature=1.0, balance_losses=on)
        grads.append(torch.autograd.grad(res.total, w)[0])
    # The same inputs: only the switch can make the gradients differ (a switch that is ignored fails here).
    assert not torch.allclose(grads[0], grads[1])


def test_global_normalisation_makes_two_halves_equal_one_batch():
    """Two 'processes' with half the batch each (sums reduced across them, gradients averaged) get the
    exact gradient of one process with the whole batch, with balancing and a ragged loss mask."""
    torch.manual_seed(0)
    w = torch.randn(3, 11, requires_grad=True)
    base = torch.randn(3, 4, 6, 11)
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.rand(4, 6) > 0.3

    def logits(rows):
        return [base[i, rows] + w[i] for i in range(3)]

    full = distill_step_losses(logits(slice(0, 4)), ids, mask, temperature=2.0, balance_losses=True)
    g_full = torch.autograd.grad(full.total, w)[0]

    halves = (slice(0, 2), slice(2, 4))
    sums = []  # what an all-reduce would see: the other half's values are added
    for part in halves:
        from amoeba_export.finetune.distill import token_losses
        lg = logits(part)
        s = [token_losses(lg[0], ids[part], mask[part]).detach()]
        s += [token_losses(x, ids[part], mask[part], lg[0].detach(), 2.0).detach() for x in lg[1:]]
        sums.append((torch.stack(s).double(), mask[part][:, 1:].sum().double()))
    g_sum = torch.zeros_like(w)
    for r, part in enumerate(halves):
        other = sums[1 - r]

        def reduce(t, other=other):
            return t + (other[1].reshape(1) if t.numel() == 1 else other[0])

        res = distill_step_losses(logits(part), ids[part], mask[part], temperature=2.0, balance_losses=True,
                                  world_size=2, reduce=reduce)
        g_sum += torch.autograd.grad(res.total, w)[0] / 2  # DDP averages
        assert res.per_shape == full.per_shape or torch.allclose(torch.tensor(res.per_shape),
                                                                 torch.tensor(full.per_shape))
    torch.testing.assert_close(g_sum, g_full, rtol=1e-5, atol=1e-6)


def test_sandwich_sampler_is_largest_smallest_and_distinct_random(tiny_plan):
    plan = Plan.load(tiny_plan)
    space = ShapeSpace.from_plan(plan)
    sampler = SandwichSampler(space, 4, seed=7)
    seen = set()
    for step in range(20):
        shapes = sampler.shapes(step)
        assert shapes[0] == space.largest and shapes[1] == space.smallest
        assert len({s.name for s in shapes[2:]}) == 2
        assert all(s not in (space.largest, space.smallest) for s in shapes[2:])
        assert sampler.shapes(step) == shapes  # a pure function of (seed, step): resumable
        seen.update(s.name for s in shapes[2:])
    assert len(seen) > 4
    assert space.largest.depth == 4 and space.smallest.depth == 2
