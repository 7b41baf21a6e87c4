"""Every family through the whole chain at tiny size (what bench/any_model.py runs), plus the architecture
table that every stage's errors quote."""

from __future__ import annotations

import pytest
import torch

from amoeba_export.architectures import STAGES, architecture, support_table, supported
from amoeba_export.artifacts import read_meta
from amoeba_export.chain import SUBNETS, run_chain
from amoeba_export.errors import UnsupportedArchitectureError
from amoeba_export.testing import FAMILIES, TEXT, tiny_amoeba_llama, tiny_family

STOCK_TYPE = {"llama3": "llama", "llama-tied": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def family_model(family, tmp_path):
    tiny_family(family, tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_elastic_full_shape_is_the_stock_model(family):
    from amoeba_export.elastic import make_elastic

    model = tiny_family(family)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(make_elastic(model)(ids), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_extract_gguf_validate(family, tmp_path, text_file):
    result = run_chain(family_model(family, tmp_path), tmp_path, exports=[("gguf", "F16"), ("gguf", "Q8_0")],
                       text_file=text_file)
    assert not result.failed, result.stages
    # Uniform widths without compensation are a stock checkpoint of the family; per-layer widths amoeba_llama.
    assert read_meta(tmp_path / "uniform")["model_type"] == STOCK_TYPE[family]
    assert read_meta(tmp_path / "per-layer")["model_type"] == "amoeba_llama"
    unsupported = sorted(k for k, v in result.stages.items() if v.startswith("unsupported"))
    # llama.cpp's limit, named by the table: its only q/k-norm graph (qwen3) has one head count for all layers.
    assert unsupported == ([] if family != "qwen3" else
                           ["gguf:F16:per-layer", "gguf:Q8_0:per-layer", "validate:gguf:F16:per-layer",
                            "validate:gguf:Q8_0:per-layer"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_layer_subnet_onnx_validates(family, tmp_path, text_file):
    result = run_chain(family_model(family, tmp_path), tmp_path, exports=[("onnx", "fp32")], text_file=text_file,
                       subnets={"per-layer": SUBNETS["per-layer"]})
    assert set(result.stages.values()) == {"ok"}, result.stages


def test_qwen3_subnet_executorch_validates(tmp_path, text_file):
    # ExecuTorch's lowering takes 20-45 s per tiny subnet here, so one family (the one with q/k norm, the only
    # architecture-specific code in the .pte module) runs in tests; bench/any_model.py runs all of them.
    result = run_chain(family_model("qwen3", tmp_path), tmp_path, exports=[("executorch", "fp32")],
                       text_file=text_file, subnets={"per-layer": SUBNETS["per-layer"]})
    assert set(result.stages.values()) == {"ok"}, result.stages


def test_table_lists_every_stage_and_errors_quote_it():
    assert supported("plan") == ["llama", "mistral", "qwen2", "qwen3"]
    assert supported("gguf") == ["llama", "mistral", "qwen2", "qwen3", "amoeba_llama"]
    assert all(set(STAGES) <= set(row) for row in support_table())
    with pytest.raises(UnsupportedArchitectureError,
                       match="'gpt2' is not supported; supported are: llama, mistral, qwen2, qwen3"):
        architecture("gpt2")
    with pytest.raises(UnsupportedArchitectureError,
                       match="cannot go through plan; supported are: llama, mistral, qwen2, qwen3 .*stock model"):
        architecture("amoeba_llama", "plan")


NO_AMOEBA = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "amoeba_export":
            raise ImportError("amoeba_export is blocked in this check")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
attn = m.model.layers[1].self_attn
print(type(attn).__name__, tuple(attn.q_norm.weight.shape))
"""


def test_amoeba_llama_with_qk_norm_loads_without_amoeba_code(tmp_path):
    import subprocess
    import sys

    from amoeba_export.hf import AmoebaLlamaConfig, AmoebaLlamaForCausalLM

    base = tiny_amoeba_llama(q_heads=(2, 4, 4), kv_heads=(2, 2, 2), mlp=(128, 32, 96)).config.to_dict()
    skip = ("model_type", "transformers_version", "architectures", "auto_map")
    config = AmoebaLlamaConfig(**{**{k: v for k, v in base.items() if k not in skip}, "qk_norm": True})
    model = AmoebaLlamaForCausalLM(config).eval()
    assert type(model.model.layers[0].self_attn).__name__ == "Qwen3Attention"
    model.save_pretrained(tmp_path / "qk")
    proc = subprocess.run([sys.executable, "-c", NO_AMOEBA, str(tmp_path / "qk")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["Qwen3Attention", "(16,)"]


def test_params_kind_transformer_leaves_out_the_embedding(capsys, tiny_plan_dir, tmp_path):
    from amoeba_export.cli import main
    from amoeba_export.plan import Plan

    dims = Plan.load(tiny_plan_dir).dims
    budget = 200_000
    for kind in ("total", "transformer"):
        assert main(["extract", str(tiny_plan_dir), "--out", str(tmp_path / kind), "--params", str(budget),
                     "--params-kind", kind, "--no-depth-maps"]) == 0
        out = capsys.readouterr().out
        params = read_meta(tmp_path / kind)["params"]
        counted = params - (dims.embedding_params if kind == "transformer" else 0)
        assert counted <= budget, (kind, counted)
        assert f"{params - dims.embedding_params:,} transformer + {dims.embedding_params:,} embedding" in out
        assert f"budget {budget:,} {kind}" in out
    # The same number buys more model when the embedding is not counted.
    assert read_meta(tmp_path / "transformer")["params"] > read_meta(tmp_path / "total")["params"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_train_then_extract_from_the_checkpoint(family, tmp_path, text_file):
    result = run_chain(family_model(family, tmp_path), tmp_path, exports=[], text_file=text_file, train_steps=2,
                       subnets={})
    assert set(result.stages.values()) == {"ok"}, result.stages
    assert read_meta(tmp_path / "trained")["model_type"] == "amoeba_llama"
