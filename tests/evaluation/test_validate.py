"""Validation against the PyTorch reference: metrics, gates, and broken artifacts caught."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from amoeba_export.backends import get_backend
from amoeba_export.errors import ConfigError, ValidationFailedError
from amoeba_export.evaluation import validate as v
from amoeba_export.testing import TEXT, tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    tiny_llama(root / "hf")
    (root / "text.txt").write_text(TEXT)
    artifact = get_backend("pytorch").export(root / "hf", root / "pt", "F32")
    return root, artifact


def test_identical_model_passes_with_exact_metrics(setup):
    root, artifact = setup
    report = v.validate_artifact(artifact.path, root / "hf", text_file=root / "text.txt", seq_len=64,
                                 max_tokens=512, progress=False)
    m = report.metrics
    assert report.passed and report.gate == "pytorch/F32"
    assert m["top1_agreement"] == 1.0 and m["cache_consistency"] == 1.0 and m["greedy_prefix_match"] == 1.0
    assert m["max_abs_logit_err"] <= 1e-6 and abs(m["mean_kl"]) <= 1e-9
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-9) and m["ppl"] > 1
    assert report.tokens == 512 and report.seq_len == 64
    json.dumps(report.to_dict())  # JSON-serialisable
    assert "PASSED" in report.table()


def test_swapped_tensors_are_caught(setup, tmp_path):
    root, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(root / "hf", broken)
    weights = load_file(str(broken / "model.safetensors"))
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"
    weights[a], weights[b] = weights[b].clone(), weights[a].clone()
    save_file(weights, str(broken / "model.safetensors"))
    artifact = get_backend("pytorch").export(broken, tmp_path / "pt", "F32")
    with pytest.raises(ValidationFailedError, match=r"failed the pytorch/F32 gate: .*FAILED by") as exc:
        v.validate_artifact(artifact.path, root / "hf", text_file=root / "text.txt", seq_len=64, max_tokens=256,
                            progress=False)
    assert exc.value.exit_code != 0
    report = v.validate_artifact(artifact.path, root / "hf", text_file=root / "text.txt", seq_len=64,
                                 max_tokens=256, raise_on_fail=False, progress=False)
    assert not report.passed and {c.metric for c in report.failures} >= {"max_abs_logit_err"}


def test_gate_checks_bound_both_ways():
    assert v.GateCheck("ppl_ratio", "max", 1.01, 1.005).passed
    assert not v.GateCheck("ppl_ratio", "max", 1.01, 1.02).passed
    assert v.GateCheck("top1_agreement", "min", 0.99, 0.995).passed
    low = v.GateCheck("top1_agreement", "min", 0.99, 0.95)
    assert not low.passed and "FAILED by 0.04" in low.describe()
    assert not v.GateCheck("mean_kl", "max", 0.1, None).passed  # an unmeasured gated metric fails


def test_gate_lookup_prefers_exact_then_generic_and_rejects_ungated():
    gates = v.load_gates()
    assert v.gate_for("gguf", "Q4_K_M", gates)[0] == "gguf/Q4_K_M"
    assert v.gate_for("somebackend", "F16", gates)[0] == "*/F16"
    with pytest.raises(ConfigError, match="no validation gate for gguf/Q3_K"):
        v.gate_for("gguf", "Q3_K", gates)


def test_every_gguf_quant_type_has_a_sane_gate():
    from amoeba_export.backends.gguf.backend import GGUFBackend

    gates = v.load_gates()
    for quant in GGUFBackend.quant_types:
        name, gate = v.gate_for("gguf", quant, gates)
        assert "ppl_ratio" in gate and "mean_kl" in gate, name
        assert 1.0 < gate["ppl_ratio"]["max"] <= 1.2, name


def test_malformed_gates_file_lists_every_problem(tmp_path):
    bad = tmp_path / "gates.json"
    bad.write_text(json.dumps({"gates": {"x/F16": {"ppl_ratio": {"below": 1}, "mean_kl": 3}}}))
    with pytest.raises(ConfigError, match="2 problem"):
        v.load_gates(bad)


class _ScriptedRunner:
    """Full-sequence logits with a fixed best token per position; ``generate`` returns a scripted sequence."""

    vocab_size = 10

    def __init__(self, tokens: list[int], gap: float) -> None:
        self.tokens, self.gap = tokens, gap

    def logits(self, ids):
        import numpy as np

        out = np.zeros((len(ids), self.vocab_size), dtype=np.float32)
        out[:, 0] = 30.0  # the full-sequence argmax is token 0 everywhere; the range is 30
        out[:, 1] = 30.0 - self.gap  # token 1 trails it by `gap`
        return out

    def generate(self, ids, n, **_):
        return self.tokens[:n]


@pytest.mark.parametrize("gap, expected", [(0.05, 1.0), (3.0, 0.5)])
def test_cache_consistency_allows_kernel_ties_but_not_a_broken_cache(gap, expected):
    """Half the cached tokens are token 1: a 0.05-logit near-tie is consistent, a 3-logit miss is not."""
    tokens = [0, 1] * (v.GENERATE_TOKENS // 2)
    runner = _ScriptedRunner(tokens, gap)
    m = v._probe_metrics(runner, runner, [5, 6, 7])
    assert m["cache_consistency"] == expected
    assert m["cache_exact_match"] == 0.5
