"""Quantization recipes for the exported decoder, as data, and the two onnxruntime quantizers that apply them.

``dynamic``: ``quantize_dynamic`` (int8 weights, int8 activations quantized per tensor at run time).
``nbits``: ``MatMulNBitsQuantizer`` (block-wise 4/8-bit weights; ``accuracy_level`` 4 computes in int8 with
per-block activation scales). Node exclusions name HF modules (``lm_head``, ``down_proj``,
``layers.0.mlp.down_proj``), matched against the module path ``graph.tidy`` put in the node name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from amoeba_export.errors import BackendError, ConfigError

RECIPE_VERSION = 1
METHODS = ("none", "dynamic", "nbits")
ALGORITHMS = ("default", "hqq")


@dataclass(frozen=True)
class QuantRecipe:
    """How one quant type is made. Every field is recorded in the artifact's meta.json."""

    method: str = "none"
    bits: int = 8
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "default"
    per_channel: bool = False  # dynamic only; known to wreck SmolLM2 (validation must catch it)
    reduce_range: bool = False  # dynamic only: 7-bit weights, so AVX2's u8*s8 pair sums cannot saturate int16
    quantize_embedding: bool = False  # nbits only: Gather -> GatherBlockQuantized (4-bit)
    keep_8bit: tuple[str, ...] = ()  # nbits 4-bit only: modules quantized to 8 bits instead (mixed precision)
    exclude: tuple[str, ...] = ()
    version: int = RECIPE_VERSION
    notes: str = field(default="", compare=False)

    def problems(self) -> list[str]:
        out = []
        if self.method not in METHODS:
            out.append(f"method {self.method!r} not in {METHODS}")
        if self.method == "nbits":
            if self.bits not in (4, 8):
                out.append(f"bits {self.bits} not in (4, 8)")
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                out.append(f"block_size {self.block_size} is not a power of two >= 16")
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                out.append(f"accuracy_level {self.accuracy_level} not in 0..4")
            if self.algorithm not in ALGORITHMS:
                out.append(f"algorithm {self.algorithm!r} not in {ALGORITHMS}")
            if self.algorithm == "hqq" and self.quantize_embedding:
                out.append("the HQQ quantizer cannot quantize the embedding (Gather)")
            if self.quantize_embedding and self.bits != 4:
                out.append("a quantized embedding (GatherBlockQuantized) is 4-bit only")
        if self.method == "dynamic" and self.bits != 8:
            out.append("dynamic quantization is 8-bit only")
        for flag in ("per_channel", "reduce_range"):
            if getattr(self, flag) and self.method != "dynamic":
                out.append(f"{flag} applies to dynamic int8 only")
        for name in ("exclude", "keep_8bit"):
            if isinstance(getattr(self, name), str):
                out.append(f"{name} must be a list of module names")
        if self.keep_8bit and (self.method != "nbits" or self.bits != 4):
            out.append("keep_8bit applies to 4-bit nbits recipes only")
        return out

    def validated(self, quant: str) -> QuantRecipe:
        problems = self.problems()
        if problems:
            raise ConfigError(f"quantization recipe for {quant!r}", problems,
                              fix="fix the listed options or use the defaults")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["keep_8bit"] = list(self.keep_8bit)
        return d


# The shipped quant types. The settings are the ones that pass the gates on SmolLM2-135M (see
# bench/onnx_speed.py and the report); defaults of the quantizers do not (ppl x1.78 for int8).
RECIPES: dict[str, QuantRecipe] = {
    "fp32": QuantRecipe(),
    "int8": QuantRecipe(method="nbits", bits=8, block_size=32, symmetric=False, accuracy_level=4,
                        notes="MatMulNBits 8-bit weights, block 32, int8 compute with per-block activation scales"),
    "int8-dynamic": QuantRecipe(method="dynamic", bits=8, exclude=("lm_head", "down_proj"),
                                notes="quantize_dynamic; lm_head and down_proj stay fp32: their inputs have outliers "
                                      "that one per-tensor activation scale cannot hold"),
    "int4": QuantRecipe(method="nbits", bits=4, block_size=32, symmetric=False, accuracy_level=4,
                        quantize_embedding=True, keep_8bit=("lm_head", "down_proj"),
                        notes="MatMulNBits 4-bit asymmetric, block 32; lm_head and down_proj 8-bit; embedding "
                              "GatherBlockQuantized 4-bit"),
    "int4-b128": QuantRecipe(method="nbits", bits=4, block_size=128, symmetric=False, accuracy_level=4,
                             quantize_embedding=True, keep_8bit=("lm_head", "down_proj"),
                             notes="as int4 with block 128 (smaller, less accurate)"),
    "int4-hqq": QuantRecipe(method="nbits", bits=4, block_size=32, algorithm="hqq", accuracy_level=4,
                            keep_8bit=("lm_head", "down_proj"),
                            notes="HQQ 4-bit, block 32 (embedding fp32: HQQ cannot quantize Gather)"),
}

_OPTION_FIELDS = {f for f in QuantRecipe.__dataclass_fields__ if f not in ("method", "version", "notes")}


def recipe_for(quant: str, options: dict[str, Any]) -> QuantRecipe:
    """The shipped recipe for ``quant`` with ``options`` (recipe field overrides) applied and validated."""
    unknown = sorted(set(options) - _OPTION_FIELDS)
    if unknown:
        raise BackendError(f"unknown ONNX quantization option(s) {', '.join(unknown)}",
                           fix=f"use only {', '.join(sorted(_OPTION_FIELDS))}")
    overrides = dict(options)
    for name in ("exclude", "keep_8bit"):
        if name in overrides and not isinstance(overrides[name], str):
            overrides[name] = tuple(overrides[name])
    return replace(RECIPES[quant], **overrides).validated(quant)


def excluded_nodes(roles: dict[str, str], patterns: tuple[str, ...]) -> list[str]:
    """Nodes whose HF module path ends with one of ``patterns`` (``down_proj`` or ``layers.0.mlp.down_proj``)."""
    return sorted(node for node, module in roles.items()
                  if any(module == p or module.endswith("." + p) for p in patterns))


def weight_nodes(roles: dict[str, str], op: str) -> list[str]:
    return sorted(node for node in roles if node.endswith("/" + op))


def untie_transposed_weights(model, skip: set[str] = frozenset()) -> list[str]:
    """Give each ``MatMul(x, Transpose(W))`` its own pre-transposed initializer; returns the MatMuls changed.

    A tied lm_head exports as a runtime Transpose of the embedding, which no quantizer touches (it only
    quantizes constant MatMul inputs), so the largest matrix of a small model would stay fp32. Nodes in
    ``skip`` stay fp32 anyway and keep sharing the embedding.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    changed, dead = [], []
    for node in graph.node:
        if node.op_type != "MatMul" or node.name in skip or node.input[1] not in producers:
            continue
        tr = producers[node.input[1]]
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        if tr.op_type != "Transpose" or tr.input[0] not in inits or (perm and list(perm[0]) != [1, 0]):
            continue
        name = tr.input[0] + ".T"
        if name not in inits:
            data = np.ascontiguousarray(numpy_helper.to_array(inits[tr.input[0]]).T)
            inits[name] = numpy_helper.from_array(data, name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        changed.append(node.name)
        consumers[tr.output[0]] -= 1
        if consumers[tr.output[0]] == 0:
            dead.append(tr)
    for tr in dead:
        graph.node.remove(tr)
    return changed


def quantize(src: Path, dst: Path, recipe: QuantRecipe, roles: dict[str, str], *, external_data: bool) -> dict:
    """Write the quantized ``src`` to ``dst``; returns notes (what was quantized, what was left fp32)."""
    import onnx

    if recipe.method not in ("dynamic", "nbits"):
        raise BackendError(f"recipe method {recipe.method!r} does not quantize", fix="pick a quant type")
    model = onnx.load(str(src))
    exclude = excluded_nodes(roles, recipe.exclude)
    untied = untie_transposed_weights(model, skip=set(exclude))
    matmuls = weight_nodes(roles, "MatMul")
    eight = [n for n in excluded_nodes(roles, recipe.keep_8bit) if n not in exclude]
    if recipe.method == "dynamic":
        _dynamic(model, dst, recipe, exclude, external_data)
    else:
        if eight:
            # nodes_to_include only adds to the op types, so the 8-bit pass excludes every other MatMul.
            others = [n for n in matmuls if n not in eight]
            model = _nbits(model, None, replace(recipe, bits=8, quantize_embedding=False, algorithm="default"), others,
                           False)
        _nbits(model, dst, recipe, exclude + eight, external_data)
    quantized = [n for n in matmuls if n not in exclude]
    return {"excluded_nodes": exclude, "quantized_matmuls": len(quantized), "fp32_matmuls": len(matmuls) -
            len(quantized), "untied": untied, "8bit_nodes": eight,
            "embedding_quantized": recipe.method == "nbits" and recipe.quantize_embedding}


def _dynamic(model, dst: Path, recipe: QuantRecipe, exclude: list[str], external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=recipe.per_channel, reduce_range=recipe.reduce_range, nodes_to_exclude=exclude,
                     use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})


def _nbits(model, dst: Path | None, recipe: QuantRecipe, exclude: list[str], external_data: bool):
    """Quantize with MatMulNBits; write to ``dst``, or return the model when ``dst`` is None."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    op_types = ("MatMul", "Gather") if recipe.quantize_embedding else ("MatMul",)
    if recipe.algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=recipe.bits,
                                              op_types_to_quantize=op_types)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                                                  accuracy_level=recipe.accuracy_level, bits=recipe.bits,
                                                  op_types_to_quantize=op_types)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config,
                                         accuracy_level=recipe.accuracy_level)
    quantizer.process()
    if recipe.algorithm == "hqq":
        # HQQ leaves accuracy_level unset; the recipe's level still applies to its MatMulNBits nodes.
        for node in quantizer.model.graph().node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", recipe.accuracy_level))
    if dst is None:
        return quantizer.model.model
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    return None
