"""Which class an extracted subnet is written as: stock wherever transformers can express it, else amoeba_llama
with the reason (architectures.subnet_class, read by extraction and by deploy sizing)."""

import subprocess
import sys

import pytest
import torch

from amoeba_export.architectures import subnet_class
from amoeba_export.artifacts import read_meta
from amoeba_export.deploy.sizing import subnet_tensors
from amoeba_export.extract import extract_subnet
from amoeba_export.plan import PlanConfig, build_plan, load_elastic
from amoeba_export.testing import tiny_llama

from .test_extract import NO_AMOEBA


@pytest.mark.parametrize("model_type,uniform,hidden,q,bias,expect,why", [
    ("llama", True, 96, 4, False, "llama", ""),
    ("llama", True, 96, 4, True, "llama", ""),  # attention_bias/mlp_bias flags hold the biases
    ("llama", True, 80, 3, False, "amoeba_llama", "divide"),  # LlamaConfig refuses hidden % heads != 0
    ("mistral", True, 80, 3, False, "mistral", ""),  # explicit head_dim honoured
    ("qwen2", True, 80, 3, False, "qwen2", ""),
    ("qwen2", True, 96, 4, True, "llama", ""),  # a Llama with q/k/v biases, plus the o/down biases
    ("qwen2", True, 80, 3, True, "amoeba_llama", "divide"),  # the Llama host cannot take 3 heads of 80
    ("qwen3", True, 96, 4, True, "amoeba_llama", "q/k norms"),
    ("qwen3", True, 80, 3, False, "qwen3", ""),
    ("llama", False, 96, 4, False, "amoeba_llama", "different widths"),
])
def test_subnet_class_table(model_type, uniform, hidden, q, bias, expect, why):
    got = subnet_class(model_type, uniform=uniform, hidden_size=hidden, q_heads=q, output_bias=bias)
    assert got.model_type == expect and got.stock is (expect != "amoeba_llama")
    assert (why in got.reason) if why else got.reason == ""
    assert got.bias_flags is (bias and got.stock)


def _plan(tmp_path, **config):
    model = tmp_path / "model"
    tiny_llama(model, layers=3, tokenizer="qwen2", **config)
    calibration = torch.randint(0, 320, (512,), generator=torch.Generator().manual_seed(0))
    plan = build_plan(model, PlanConfig(seq_len=64, width_tokens=256, depth_tokens=128, round_to=8),
                      progress=False, calibration=calibration)
    return plan.save(tmp_path / "plan")


def _check_loads_stock(tmp_path, out, expected_class, plan_dir, shape, compensate):
    """The folder loads without amoeba_export as ``expected_class`` and equals the elastic subnet (1e-4)."""
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", NO_AMOEBA, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected_class
    elastic, _ = load_elastic(plan_dir, compensate=compensate)
    with torch.no_grad():
        ref = elastic(ids, shape)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), ref, atol=1e-4, rtol=0)


def test_compensated_qwen2_subnet_is_a_stock_llama(tmp_path):
    plan_dir = _plan(tmp_path, arch="qwen2", hidden=96, heads=6, kv_heads=2, intermediate=128)
    out = extract_subnet(plan_dir, tmp_path / "sub", depth=3, width=0.66, mode="uniform", compensate="lstsq",
                         depth_maps=False)
    meta = read_meta(out)
    assert meta["stock"] and meta["model_type"] == "llama" and "not_stock_because" not in meta
    from amoeba_export.plan import Plan

    plan = Plan.load(plan_dir)
    shape = plan.shape(3, 0.66, "uniform")
    assert max(shape.q_heads) < 6  # narrowed: the o_proj refit adds a bias Qwen2's class has no slot for
    _check_loads_stock(tmp_path, out, "LlamaForCausalLM", plan_dir, shape, "lstsq")
    # Sizing lists exactly the tensors written (q/k/v biases of Qwen2 plus the flags' zero biases).
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    listed = {t.name: t.shape for t in subnet_tensors(plan.dims, shape, model_type="qwen2", qkv_bias=True)}
    assert listed == written


def test_heads_that_do_not_divide_the_hidden_size(tmp_path):
    """Qwen2 honours an explicit head_dim: 3 heads of 16 in a hidden size of 80 stay stock without compensation;
    with compensation the Llama host would be needed, which refuses it, so the subnet is amoeba_llama and says
    why."""
    plan_dir = _plan(tmp_path, arch="qwen2", hidden=80, heads=5, kv_heads=5, intermediate=96)
    from amoeba_export.plan import Plan

    shape = Plan.load(plan_dir).shape(3, 0.6, "uniform")
    assert max(shape.q_heads) == 3 and 80 % 3
    stock = extract_subnet(plan_dir, tmp_path / "stock", depth=3, width=0.6, mode="uniform", compensate="none",
                           depth_maps=False)
    assert read_meta(stock)["model_type"] == "qwen2"
    _check_loads_stock(tmp_path, stock, "Qwen2ForCausalLM", plan_dir, shape, "none")
    comp = extract_subnet(plan_dir, tmp_path / "comp", depth=3, width=0.6, mode="uniform", compensate="lstsq",
                          depth_maps=False)
    meta = read_meta(comp)
    assert meta["model_type"] == "amoeba_llama" and "divide" in meta["not_stock_because"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_budgets_and_sizes_count_the_family_weights(tmp_path, arch):
    """Qwen2's q/k/v biases and Qwen3's q/k norms are in Shape.num_params and in sizing's tensor list: both equal
    what extraction writes."""
    from safetensors import safe_open

    from amoeba_export.plan import Plan

    plan_dir = _plan(tmp_path, arch=arch, hidden=96, heads=6, kv_heads=2, intermediate=128)
    plan = Plan.load(plan_dir)
    assert (plan.dims.qkv_bias, plan.dims.qk_norm) == (arch == "qwen2", arch == "qwen3")
    shape = plan.shape(3, 0.66, "uniform")
    out = extract_subnet(plan_dir, tmp_path / "sub", depth=3, width=0.66, mode="uniform", compensate="none",
                         depth_maps=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert read_meta(out)["params"] == shape.num_params(plan.dims) == plan.params_for(shape, compensate="none")
    listed = {t.name: t.shape for t in subnet_tensors(plan.dims, shape, model_type=arch, compensate=False)}
    assert listed == written


def test_a_plan_written_before_the_family_flags_still_applies(tmp_path):
    """Older plans' dims have no qkv_bias/qk_norm: Plan.load reads them from the model's config, so the plan still
    matches its Qwen2 model."""
    import json

    from amoeba_export.plan import Plan

    plan_dir = _plan(tmp_path, arch="qwen2", hidden=96, heads=6, kv_heads=2, intermediate=128)
    body = json.loads((plan_dir / "plan.json").read_text())
    del body["dims"]["qkv_bias"], body["dims"]["qk_norm"]
    (plan_dir / "plan.json").write_text(json.dumps(body))
    meta = json.loads((plan_dir / "meta.json").read_text())
    meta.pop("files")  # as a plan written before file records
    (plan_dir / "meta.json").write_text(json.dumps(meta))
    assert Plan.load(plan_dir).dims.qkv_bias
    load_elastic(plan_dir)  # the dims match the model's
