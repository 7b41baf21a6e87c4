import copy

import torch

from amoeba_export.finetune.config import SMoLConfig
from amoeba_export.finetune.model import SMoLModel, merge_for_shape, model_adapters
from amoeba_export.plan import load_elastic


def _trained_like(plan_dir, experts=5):
    elastic, plan = load_elastic(plan_dir, depth_maps=False)  # as training runs it (amoeba train)
    model = SMoLModel(elastic, SMoLConfig(experts=experts, rank=4))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in model_adapters(elastic):
            ad.lora_B.normal_(0, 0.05, generator=gen)
        for p in ([] if model.gate is None else model.gate.parameters()):
            p.normal_(0, 1.0, generator=gen)
    return model, plan


def test_gate_is_deterministic_at_eval_and_noisy_in_training(tiny_plan):
    model, plan = _trained_like(tiny_plan)
    small, full = plan.smallest_shape(), plan.shape(4, 1.0)
    model.eval()
    g1, g2 = model.gate(small).detach(), model.gate(small).detach()
    assert torch.equal(g1, g2)
    assert int((g1 > 0).sum()) == 2 and abs(float(g1.sum()) - 1) < 1e-6  # top-2 softmax
    assert not torch.equal(model.gate.encode(small), model.gate.encode(full))
    model.train()
    with torch.no_grad():
        model.gate.noise.bias.fill_(3.0)  # large learnt noise level
    noisy = [model.gate(small, noise_seed=s) for s in range(8)]
    assert any(not torch.equal(n, noisy[0]) for n in noisy)
    assert torch.equal(model.gate(small, noise_seed=3), noisy[3])  # seeded noise: reproducible on every rank


def test_merged_weights_equal_active_lora(tiny_plan):
    model, plan = _trained_like(tiny_plan)
    model.eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    for shape in (plan.smallest_shape(), plan.shape(3, 0.75), plan.shape(4, 1.0)):
        with torch.no_grad():
            active = model.run_shape(ids, shape)
        merged = copy.deepcopy(model.elastic)
        merge_for_shape(merged, shape)
        with torch.no_grad():
            for block in merged.layers:
                for lin in block.projections().values():
                    lin.weight.copy_(lin.effective_weight())  # full-size merge; the shape slices it
                    lin.adapter = None
            plain = merged(ids, shape)
        torch.testing.assert_close(plain, active, rtol=0, atol=1e-4)


def test_single_lora_mode_has_no_gate(tiny_plan):
    model, plan = _trained_like(tiny_plan, experts=1)
    assert model.gate is None
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        out = model(ids, [plan.smallest_shape()])[0]
    assert out.shape == (1, 8, 320)


def test_only_adapters_and_gate_train(tiny_plan):
    model, _ = _trained_like(tiny_plan)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapter." in n or n.startswith("gate.") for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert sum(".adapter.lora_A" in n for n in names) == 4 * 7
