"""Which architectures each stage supports: one table, quoted by every "not supported" error.

Light on purpose (no torch, no transformers): the CLI, the config checks and every backend import it.

Stages: ``plan``/``train``/``extract`` take a stock model (they make it elastic); ``gguf``/``onnx``/
``executorch`` export an HF folder (a stock model or an extracted subnet, ``amoeba_llama`` included);
``validate`` compares an artifact with the folder it came from. ``amoeba_llama`` is what extraction writes
for per-layer widths or compensation biases a stock class cannot hold; it is never made elastic again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedArchitectureError

STAGES = ("plan", "train", "extract", "gguf", "onnx", "executorch", "validate")
ELASTIC_STAGES = frozenset({"plan", "train", "extract"})
EXPORT_STAGES = frozenset({"gguf", "onnx", "executorch", "validate"})
ALL_STAGES = ELASTIC_STAGES | EXPORT_STAGES


@dataclass(frozen=True)
class Architecture:
    """One HF ``model_type`` and what the pipeline does with it.

    ``gguf_arch`` / ``gguf_arch_per_layer``: the llama.cpp graph a folder of this type is written as, for
    uniform and for per-layer widths ("" = cannot be written). ``gguf_rope_permute``: whether Q/K rows are
    permuted from HF's rotate-half layout to the interleaved pairs of llama.cpp's ``llama``/``deci`` graphs
    (the ``qwen3`` graph uses NEOX-style RoPE, which is HF's own layout)."""

    model_type: str
    hf_class: str
    stages: frozenset[str]
    family: str
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    gguf_arch: str = "llama"
    gguf_arch_per_layer: str = "deci"
    gguf_rope_permute: bool = True
    # Extracted subnets. ``head_dim_free``: transformers' config for this type honours an explicit ``head_dim``
    # when the kept head count does not divide the hidden size (transformers 5: Mistral/Qwen2/Qwen3 do;
    # LlamaConfig refuses it in its validation). ``bias_host``: the stock type that computes the same function
    # and can hold o_proj/down_proj compensation biases ("" = none can; amoeba_llama then).
    head_dim_free: bool = True
    bias_host: str = "llama"
    note: str = ""


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", ALL_STAGES, "llama", head_dim_free=False,
                 note="Llama 1-3.x (rope default, linear or llama3 scaling), SmolLM2; tied or untied embeddings, "
                      "attention/MLP biases"),
    Architecture("mistral", "MistralForCausalLM", ALL_STAGES, "mistral",
                 note="llama.cpp's graphs do not apply the sliding window (the GGUF meta says so)"),
    # Qwen2 is a Llama with q/k/v biases. It is written as llama.cpp's llama/deci graph, not qwen2: the qwen2
    # graph reads one head count for every layer and loads no o_proj/down_proj bias, so per-layer subnets and
    # compensated subnets could not load there; llama/deci compute the same function (Q/K rows permuted for
    # their RoPE layout) and take both.
    Architecture("qwen2", "Qwen2ForCausalLM", ALL_STAGES, "qwen2",
                 note="GGUF as llama/deci: llama.cpp's qwen2 graph cannot load pruned per-layer heads"),
    # Qwen3 adds per-head RMSNorm on q and k. llama.cpp's llama/deci graphs have no q/k-norm weights and its
    # qwen3 graph reads one head count for every layer and no o_proj/down_proj bias, so only uniform subnets
    # without compensation biases (and the full model) become GGUF files.
    # No stock class holds both Qwen3's q/k norms and an o_proj/down_proj bias: compensated subnets are
    # amoeba_llama.
    Architecture("qwen3", "Qwen3ForCausalLM", ALL_STAGES, "qwen3", qk_norm=True, gguf_arch="qwen3",
                 gguf_arch_per_layer="", gguf_rope_permute=False, bias_host="",
                 note="GGUF only for uniform widths without o_proj/down_proj biases (llama.cpp's qwen3 graph)"),
    Architecture("amoeba_llama", "AmoebaLlamaForCausalLM", EXPORT_STAGES, "subnet", bias_host="",
                 note="an extracted subnet with per-layer widths or compensation biases"),
)}

# RoPE variants per stage. The elastic core, ONNX and ExecuTorch run transformers' own rotary module, so they
# take whatever transformers does; a GGUF carries RoPE as metadata (plus llama3's per-frequency factors as the
# rope_freqs tensor), so only what the writer can express is listed.
ROPE_TYPES: dict[str, tuple[str, ...]] = {"gguf": ("default", "linear", "llama3")}


def supported(stage: str) -> list[str]:
    """model_types ``stage`` accepts, in table order."""
    return [a.model_type for a in ARCHITECTURES.values() if stage in a.stages]


def support_table() -> list[dict[str, Any]]:
    """The table as rows (for docs and ``--help``-style listings)."""
    return [{"model_type": a.model_type, "family": a.family, **{s: s in a.stages for s in STAGES},
             "qk_norm": a.qk_norm, "gguf": f"{a.gguf_arch or '-'}/{a.gguf_arch_per_layer or '-'}", "note": a.note}
            for a in ARCHITECTURES.values()]


def architecture(model_type: Any, stage: str | None = None, *, fix: str | None = None) -> Architecture:
    """The table's entry for ``model_type`` at ``stage`` (None: any stage, as loading a folder needs);
    raises UnsupportedArchitectureError quoting the table."""
    entry = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if entry is not None and (stage is None or stage in entry.stages):
        return entry
    # Without a stage, users bring stock models: name those (amoeba_llama folders are written by extract).
    names = ", ".join(supported(stage or "plan"))
    why = "is not supported" if entry is None else f"cannot go through {stage}"
    if entry is not None and entry.model_type == "amoeba_llama":
        fix = fix or "pass the stock model the subnet was extracted from"
    raise UnsupportedArchitectureError(f"architecture {model_type!r} {why}; supported are: {names}",
                                       fix=fix or "pass a Llama-family checkpoint (Llama, Mistral, Qwen2, Qwen3)")


@dataclass(frozen=True)
class SubnetClass:
    """The class an extracted subnet is written as: ``model_type`` of its config.json, whether that is a stock
    class (loads with plain transformers and llama.cpp's converter), and why not when it is ``amoeba_llama``.
    ``bias_flags``: the stock Llama's ``attention_bias``/``mlp_bias`` flags carry the compensation biases, so
    every projection those flags cover gets a (zero where unused) bias."""

    model_type: str
    reason: str = ""
    bias_flags: bool = False

    @property
    def stock(self) -> bool:
        return self.model_type != "amoeba_llama"


def subnet_class(model_type: str, *, uniform: bool, hidden_size: int, q_heads: int,
                 output_bias: bool) -> SubnetClass:
    """Which class a subnet of a ``model_type`` model is written as (extraction and sizing both ask this).

    ``uniform``: every layer has the same widths; ``q_heads``: the kept query heads per layer;
    ``output_bias``: compensation put a bias on o_proj or down_proj."""
    entry = ARCHITECTURES.get(model_type)
    if entry is None or "extract" not in entry.stages:
        return SubnetClass("amoeba_llama", f"{model_type!r} is not a stock type extraction writes")
    if not uniform:
        return SubnetClass("amoeba_llama", "its layers have different widths (no stock class holds per-layer "
                                           "head counts or MLP sizes)")
    host = entry if not output_bias else ARCHITECTURES.get(entry.bias_host)
    if host is None:
        return SubnetClass("amoeba_llama", f"it has o_proj/down_proj compensation biases and no stock class holds "
                                           f"them together with {model_type}'s other weights (e.g. q/k norms); "
                                           f"extract with --compensate none for a stock {entry.hf_class}")
    if hidden_size % q_heads and not host.head_dim_free:
        return SubnetClass("amoeba_llama", f"{q_heads} heads do not divide the hidden size {hidden_size}, and "
                                           f"transformers' {host.hf_class} config refuses that even with an "
                                           f"explicit head_dim")
    return SubnetClass(host.model_type, bias_flags=output_bias)


def rope_type(config: Mapping[str, Any]) -> str:
    """The RoPE variant of a config.json dict (transformers 5 ``rope_parameters`` or 4.x ``rope_scaling``)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return str(rope.get("rope_type") or rope.get("type") or "default")


def qk_norm(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict describes per-head q/k RMSNorm (stock Qwen3, or a subnet of one)."""
    entry = ARCHITECTURES.get(config.get("model_type", ""))
    return bool(config.get("qk_norm")) or bool(entry and entry.qk_norm)
