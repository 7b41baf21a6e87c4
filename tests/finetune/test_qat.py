"""Quantization-aware elastic fine-tuning: the QAT forward of a shape is the converted subnet's forward, a QAT
train step trains the LoRA factors, and bad schemes are refused up front."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from amoeba_export.backends.executorch.recipes import RECIPES, _config, get_recipe, plan_linears
from amoeba_export.cli import main
from amoeba_export.errors import ConfigError
from amoeba_export.extract import write_subnet
from amoeba_export.finetune.config import QAT_SCHEMES, TrainConfig
from amoeba_export.finetune.distill import distill_step_losses
from amoeba_export.finetune.model import SMoLModel, merge_for_shape, model_adapters
from amoeba_export.finetune.qat import attach_fake_quant, base_model, detach_fake_quant
from amoeba_export.modelio import load_model
from amoeba_export.testing import TEXT

# The tiny plan's shapes (head_dim 16, so an int4 group of 32 spans two heads of o_proj's input and the export's
# group-major head order matters; MLP widths 104 and 88 fall back to 8-bit per channel).
SHAPES = [(4, 1.0), (3, 0.75), (2, 0.5)]


@pytest.fixture(scope="module")
def lora_model(tiny_plan):
    """The tiny plan's elastic model with SMoL adapters whose B factors are non-zero (ΔW matters)."""
    from amoeba_export.finetune.config import SMoLConfig
    from amoeba_export.plan import load_elastic

    elastic, plan = load_elastic(tiny_plan, depth_maps=False)  # QAT trains without depth maps
    wrapper = SMoLModel(elastic, SMoLConfig(), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in model_adapters(elastic):
            ad.lora_B.copy_(0.05 * torch.randn(ad.lora_B.shape, generator=gen))
    wrapper.eval()
    return elastic, plan


def _converted(folder, recipe, algorithm: str | None):
    """The extracted HF subnet with its decoder linears quantized by torchao as the recipe does (lm_head left
    fp32, as QAT leaves it); ``algorithm`` replaces the recipe's int4 scale algorithm (HQQ) unless None."""
    from torchao.quantization import quantize_

    model = load_model(folder).eval()
    plan, _ = plan_linears(model, recipe)
    plan.pop("lm_head", None)
    for key in sorted(set(plan.values()), key=str):
        config = _config(*key)
        if key[0] == "8da4w" and algorithm is not None:
            config = dataclasses.replace(config, intx_choose_qparams_algorithm=algorithm)
        quantize_(model, config, filter_fn=lambda m, fqn, key=key: plan.get(fqn) == key)
    return model


def _subnet(elastic, plan, depth, width, scheme, scales, folder):
    """(shape, QAT logits, fp logits, converted model) of one shape; QAT is detached again afterwards."""
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    shape = plan.shape(depth, width)
    merge_for_shape(elastic, shape)
    with torch.no_grad():
        fp = elastic(ids, shape)
        attach_fake_quant(elastic, scheme, scales=scales)
        try:
            qat = elastic(ids, shape)
        finally:
            detach_fake_quant(elastic)
        write_subnet(elastic, shape, folder, source_dir=plan.model_dir)
        # torchao's converted linear: per-token int8 activations, dequantized weights, a float matmul. QAT's
        # default absmax int4 scales are torchao's "affine" algorithm; with qat_scales "hqq" the recipe as it is.
        converted = _converted(folder, get_recipe(scheme), "affine" if scales == "absmax" else None)
        want = converted(input_ids=ids, use_cache=False).logits
    return shape, qat, fp, converted, want


# Every scheme with torchao's absmax scales; HQQ scales only change int4 grids (8da8w has none).
SETTINGS = [(scheme, "absmax") for scheme in QAT_SCHEMES] + [("8da4w", "hqq"), ("8da4w-attn", "hqq")]


@pytest.mark.parametrize("scheme, scales", SETTINGS)
def test_qat_forward_equals_the_converted_subnet(lora_model, tmp_path, scheme, scales, one_thread):
    elastic, plan = lora_model
    for depth, width in SHAPES:
        shape, qat, fp, _, want = _subnet(elastic, plan, depth, width, scheme, scales,
                                          tmp_path / f"d{depth}-w{width}")
        effect = (qat - fp).abs()
        assert effect.max() > 0.1  # the fake quantization is really on
        # Equal to float noise (measured ≤ 2.3e-6 on logits up to ≈ 5) unless that noise (the two models sum in
        # different orders) moved one int8 activation across a rounding boundary: one step for that token, which
        # attention carries to later tokens (8da8w at d3-w0.75: mean |Δ| 7 % of the quantization's own effect).
        # Each linear is compared exactly on the same input in test_qat_linears_equal_the_converted_linears.
        diff = (qat - want).abs()
        assert diff.mean() <= 0.1 * effect.mean() and diff.max() <= 0.25 * effect.max(), (depth, width)


@pytest.mark.parametrize("scheme, scales", SETTINGS)
def test_qat_linears_equal_the_converted_linears(lora_model, tmp_path, scheme, scales, one_thread):
    """Every decoder linear of the subnet, fed the same input: the QAT path (sliced + LoRA-merged + refit weight,
    fake-quantized by the hook) gives the converted linear's output, in export layout, to float noise."""
    elastic, plan = lora_model
    gen = torch.Generator().manual_seed(2)
    for depth, width in SHAPES:
        shape, _, _, converted, _ = _subnet(elastic, plan, depth, width, scheme, scales,
                                            tmp_path / f"d{depth}-w{width}")
        linears = dict(converted.named_modules())
        attach_fake_quant(elastic, scheme, scales=scales)
        try:
            for new, (layer, q, kv, m) in enumerate(zip(shape.layers, shape.q_heads, shape.kv_heads, shape.mlp)):
                block, hd = elastic.layers[layer], plan.dims.head_dim
                heads = elastic._head_channels(elastic.group_major_heads(q, kv))  # export column j = ours heads[j]
                for name, out_f, in_f in (("q_proj", q * hd, None), ("k_proj", kv * hd, None),
                                          ("v_proj", kv * hd, None), ("gate_proj", m, None), ("up_proj", m, None),
                                          ("o_proj", None, q * hd), ("down_proj", None, m)):
                    part = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
                    conv = linears[f"model.layers.{new}.{part}.{name}"]
                    x = torch.randn(3, 5, conv.in_features, generator=gen)
                    with torch.no_grad():
                        want = conv(x)
                        if in_f is not None:  # o_proj/down_proj: the block's projection (refit when narrowed)
                            x_ours = x[..., torch.argsort(heads)] if name == "o_proj" else x
                            got = block._project(name, x_ours, in_f)
                        else:
                            got = getattr(block, name)(x, out_f)
                            got = got[..., heads] if name == "q_proj" else got
                    torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{depth}/{width} {name}")
        finally:
            detach_fake_quant(elastic)


def test_qat_schemes_are_executorch_recipes():
    for scheme in QAT_SCHEMES:
        recipe = RECIPES[scheme]
        assert not recipe.broken and recipe.linear in ("8da4w", "8da8w"), scheme


@pytest.mark.parametrize("scales", ["absmax", "hqq"])
def test_qat_train_step_trains_the_lora_factors(tiny_plan, scales, one_thread):
    from amoeba_export.finetune.config import SMoLConfig
    from amoeba_export.plan import load_elastic

    elastic, plan = load_elastic(tiny_plan, depth_maps=False)
    model = SMoLModel(elastic, SMoLConfig(), seed=0)
    hooks = attach_fake_quant(elastic, "8da4w", scales=scales)
    assert len(hooks) == 7 * plan.dims.num_layers and elastic.lm_head.__class__ is torch.nn.Linear
    model.train()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    shapes = [plan.shape(4, 1.0), plan.shape(2, 0.5), plan.shape(3, 0.75)]
    for step in range(2):  # the first step as training starts (B = 0), the second as it goes on (B ≠ 0)
        model.zero_grad(set_to_none=True)
        losses = distill_step_losses(model(ids, shapes, [1, 2, 3]), ids, torch.ones_like(ids), temperature=1.0,
                                     balance_losses=True)
        losses.total.backward()
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.per_shape)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        # Gradients reach every adapter through the fake quantization (straight-through rounding). With B = 0
        # only B's do (ΔW = B·A), and the gate's follow once B is non-zero.
        trained = [n for n, g in grads.items() if float(g.abs().max()) > 0]
        assert all(n in trained for n in grads if n.endswith("lora_B"))
        if step:
            assert all(n in trained for n in grads if n.endswith("lora_A"))
            assert any(n.startswith("gate.") for n in trained)
        with torch.no_grad():
            for ad in model_adapters(elastic):
                ad.lora_B.add_(0.05 * torch.randn(ad.lora_B.shape, generator=torch.Generator().manual_seed(3)))


def test_base_teacher_is_the_frozen_base_model_and_every_shape_learns_from_it(tiny_plan, one_thread):
    """Inside ``base_model`` the QAT model with trained adapters computes exactly the base model (no adapter, no
    fake quantization), and hooks and adapters are back afterwards; with that teacher every shape's loss, the
    largest's included, is the soft cross-entropy to it instead of the largest's cross-entropy on the text."""
    from amoeba_export.finetune.config import SMoLConfig
    from amoeba_export.finetune.distill import token_losses
    from amoeba_export.plan import load_elastic

    base, plan = load_elastic(tiny_plan, depth_maps=False)
    elastic, _ = load_elastic(tiny_plan, depth_maps=False)
    model = SMoLModel(elastic, SMoLConfig(), seed=0).eval()
    with torch.no_grad():
        for ad in model_adapters(elastic):  # non-zero B: the adapters change the forward
            ad.lora_B.copy_(0.05 * torch.randn(ad.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    shapes = [plan.shape(4, 1.0), plan.shape(2, 0.5)]
    with torch.no_grad():
        want_teacher = base(ids, shapes[0])
        adapted = model.run_shape(ids, shapes[0])
        hooks = attach_fake_quant(elastic, "8da4w")
        quantized = model.run_shape(ids, shapes[0])
        with base_model(elastic):
            teacher = elastic(ids, shapes[0])
        assert torch.allclose(teacher, want_teacher, atol=1e-5)
        assert not torch.allclose(adapted, want_teacher, atol=1e-3)
        assert not torch.allclose(quantized, adapted, atol=1e-3)
        assert torch.equal(model.run_shape(ids, shapes[0]), quantized)  # hooks and adapters restored
        assert [lin.fake_quant for b in elastic.layers for lin in b.projections().values()] == hooks
    mask = torch.ones_like(ids)
    logits = model(ids, shapes)
    losses = distill_step_losses(logits, ids, mask, temperature=1.0, balance_losses=False, teacher=teacher)
    count = mask[:, 1:].sum().item()
    want = [float(token_losses(lg, ids, mask, teacher, 1.0).detach()) / count for lg in logits]
    assert losses.per_shape == pytest.approx(want, rel=1e-5)
    labels = distill_step_losses(logits, ids, mask, temperature=1.0, balance_losses=False)
    assert labels.per_shape[0] == pytest.approx(float(token_losses(logits[0], ids, mask).detach()) / count, rel=1e-5)
    assert labels.per_shape[0] != pytest.approx(losses.per_shape[0], rel=1e-3)


def test_train_cli_with_qat_records_it(tiny_plan, tmp_path, one_thread):
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["train", "--plan", str(tiny_plan), "--out", str(out), "--data", str(data), "--seq-len", "16",
                 "--steps", "2", "--lr", "1e-2", "--quiet", "--qat", "8da4w", "--qat-scales", "hqq",
                 "--qat-teacher", "base"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["qat"] == {"scheme": "8da4w", "scales": "hqq"}
    assert (meta["train"]["qat"], meta["train"]["qat_scales"], meta["train"]["qat_teacher"]) == ("8da4w", "hqq", "base")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(list(e["loss"].values()))).all() for e in log)


def test_bad_qat_scheme_is_a_config_error(tiny_plan, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"qat 'int4' .*\(supported are: 8da4w, 8da4w-attn, 8da8w\)"):
        TrainConfig(qat="int4").validate()
    with pytest.raises(ConfigError, match=r"qat_scales 'gptq' .*\(supported are: absmax, hqq\)"):
        TrainConfig(qat="8da4w", qat_scales="gptq").validate()
    with pytest.raises(ConfigError, match=r"qat_scales 'hqq' needs a qat scheme"):
        TrainConfig(qat_scales="hqq").validate()
    with pytest.raises(ConfigError, match=r"qat_teacher 'labels' needs a qat scheme"):
        TrainConfig(qat_teacher="labels").validate()
    with pytest.raises(ConfigError, match=r"qat_teacher 'int8' .*\(supported are: base, labels\)"):
        TrainConfig(qat="8da4w", qat_teacher="int8").validate()
    with pytest.raises(ConfigError, match=r"supported are: 8da4w, 8da4w-attn, 8da8w"):
        attach_fake_quant(None, "8da4w-g128")  # the same check where QAT is switched on
    assert main(["train", "--plan", str(tiny_plan), "--out", str(tmp_path / "run"), "--qat", "4bit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "supported are: 8da4w, 8da4w-attn, 8da8w" in err
    assert not (tmp_path / "run").exists()


def test_qat_round_trips_and_older_configs_load_without_it():
    config = TrainConfig(qat="8da4w-attn", qat_scales="hqq", qat_teacher="base").validate()
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    old = TrainConfig().to_dict()
    del old["qat"], old["qat_scales"], old["qat_teacher"]
    assert TrainConfig.from_dict(old) == TrainConfig()
    # A QAT run written before the teacher was a field trained on labels, and resumes so.
    old_qat = TrainConfig(qat="8da4w").to_dict()
    del old_qat["qat_teacher"]
    assert TrainConfig.from_dict(old_qat).qat_teacher == "labels" and TrainConfig(qat="8da4w").qat_teacher == "base"
