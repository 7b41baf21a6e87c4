"""Quantization recipes for the exported decoder, as data, and the two onnxruntime quantizers that apply them.

``dynamic``: ``quantize_dynamic`` (int8 weights, int8 activations quantized per tensor at run time).
``nbits``: ``MatMulNBitsQuantizer`` (block-wise 4/8-bit weights; ``accuracy_level`` 4 computes in int8 with
per-block activation scales). Node exclusions name HF modules (``lm_head``, ``down_proj``,
``layers.0.mlp.down_proj``), matched against the module path ``graph.tidy`` put in the node name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amoeba_export.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import numpy as np

RECIPE_VERSION = 1
METHODS = ("none", "dynamic", "nbits")
# default: round-to-nearest per block; hqq: half-quadratic optimisation of scales and zero points (no data);
# gptq: GPTQ's column-by-column error feedback through each MatMul's input Hessian from calibration rows.
ALGORITHMS = ("default", "hqq", "gptq")


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
    calibration_tokens: int = 0  # gptq only: tokens of the calibration split its Hessians are gathered on
    calibration_seq_len: int = 512
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
            if self.algorithm in ("hqq", "gptq") and self.quantize_embedding:
                out.append(f"the {self.algorithm.upper()} quantizer cannot quantize the embedding (Gather)")
            if self.algorithm == "gptq":
                if self.bits != 4:
                    out.append("onnxruntime's GPTQ writes MatMulNBits for 4 bits only")
                if self.calibration_tokens < self.calibration_seq_len:
                    out.append(f"gptq needs calibration_tokens ≥ calibration_seq_len ({self.calibration_seq_len})")
                if self.exclude:
                    out.append("onnxruntime's GPTQ path ignores excluded nodes; use keep_8bit instead of exclude")
            elif self.calibration_tokens:
                out.append("calibration_tokens applies to the gptq algorithm only")
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
    "int4-hqq-b128": QuantRecipe(method="nbits", bits=4, block_size=128, algorithm="hqq", accuracy_level=4,
                                 keep_8bit=("lm_head", "down_proj"),
                                 notes="HQQ 4-bit, block 128 (embedding fp32: HQQ cannot quantize Gather)"),
    # GPTQ on 2,048 calibration tokens: Hessians of 576-wide inputs are well conditioned from that many (with
    # onnxruntime's 1 % dampening), and its pass runs the whole graph once per distinct MatMul input and row.
    "int4-gptq": QuantRecipe(method="nbits", bits=4, block_size=32, algorithm="gptq", accuracy_level=4,
                             keep_8bit=("lm_head", "down_proj"), calibration_tokens=2048,
                             notes="GPTQ 4-bit asymmetric, block 32, Hessians from 2,048 calibration tokens; "
                                   "lm_head and down_proj 8-bit; embedding fp32"),
    "int4-gptq-b128": QuantRecipe(method="nbits", bits=4, block_size=128, algorithm="gptq", accuracy_level=4,
                                  keep_8bit=("lm_head", "down_proj"), calibration_tokens=2048,
                                  notes="as int4-gptq with block 128"),
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


def quantize(src: Path, dst: Path, recipe: QuantRecipe, roles: dict[str, str], *, external_data: bool,
             calibration: np.ndarray | None = None) -> dict:
    """Write the quantized ``src`` to ``dst``; returns notes (what was quantized, what was left fp32).
    ``calibration``: ``[n, seq_len]`` token rows, for the gptq algorithm."""
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
        _nbits(model, dst, recipe, exclude + eight, external_data, calibration)
    quantized = [n for n in matmuls if n not in exclude]
    return {"excluded_nodes": exclude, "quantized_matmuls": len(quantized), "fp32_matmuls": len(matmuls) -
            len(quantized), "untied": untied, "8bit_nodes": eight,
            "embedding_quantized": recipe.method == "nbits" and recipe.quantize_embedding}


def _dynamic(model, dst: Path, recipe: QuantRecipe, exclude: list[str], external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=recipe.per_channel, reduce_range=recipe.reduce_range, nodes_to_exclude=exclude,
                     use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})


def _nbits(model, dst: Path | None, recipe: QuantRecipe, exclude: list[str], external_data: bool,
           calibration: np.ndarray | None = None):
    """Quantize with MatMulNBits; write to ``dst``, or return the model when ``dst`` is None."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    op_types = ("MatMul", "Gather") if recipe.quantize_embedding else ("MatMul",)
    if recipe.algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=recipe.bits,
                                              op_types_to_quantize=op_types)
    elif recipe.algorithm == "gptq":
        if calibration is None:
            raise BackendError("the gptq algorithm needs calibration rows", fix="export through the ONNX backend")
        # GPTQ's block_size is its column batch; the quantization block is the quantizer's own block_size.
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_DecoderRows(model, calibration),
                                               op_types_to_quantize=op_types)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                                                  accuracy_level=recipe.accuracy_level, bits=recipe.bits,
                                                  op_types_to_quantize=op_types)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config,
                                         accuracy_level=recipe.accuracy_level, block_size=recipe.block_size,
                                         is_symmetric=recipe.symmetric, bits=recipe.bits)
    if recipe.algorithm == "gptq":
        from onnxruntime.quantization.neural_compressor import weight_only

        # onnxruntime's own gptq() feeds no error forward (see gptq_rows); its data plumbing (Hessians from the
        # calibration rows, MatMulNBits packing) is kept and only the per-matrix solve is ours.
        upstream, weight_only.gptq = weight_only.gptq, gptq_rows
        try:
            quantizer.process()
        except ValueError as exc:
            # Measured on SmolLM2-135M with block 128: onnxruntime 1.32's GPTQ packer cannot lay out the zero
            # points of a 576-wide input (4.5 blocks, padded to 5): "cannot reshape array of size 1440".
            raise BackendError(f"onnxruntime's GPTQ could not pack a {recipe.block_size}-block MatMul of this "
                               f"model ({exc})", fix="use int4-gptq (block 32) or int4-hqq-b128") from exc
        finally:
            weight_only.gptq = upstream
    else:
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


class _DecoderRows:
    """onnxruntime's CalibrationDataReader over token rows: the decoder's inputs for each row with an empty KV
    cache (past shapes read from the graph), as the runner feeds a prompt."""

    def __init__(self, model, rows: np.ndarray) -> None:
        import numpy as np

        self.past = {}
        for inp in model.graph.input:
            if inp.name.startswith("past_key_values."):
                dims = inp.type.tensor_type.shape.dim  # [batch, kv_heads, past, head_dim]
                self.past[inp.name] = (dims[1].dim_value, dims[3].dim_value)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        import numpy as np

        if self.next >= len(self.rows):
            return None
        ids = self.rows[self.next][None]
        self.next += 1
        seq = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, seq), np.int64),
                "position_ids": np.arange(seq, dtype=np.int64)[None]}
        feed.update({name: np.zeros((1, h, 0, d), np.float32) for name, (h, d) in self.past.items()})
        return feed

    def __iter__(self):
        return iter(self.get_next, None)


def gptq_rows(W, H, num_bits=4, group_size=32, scheme="asym", blocksize=128, percdamp=0.01, actorder=False,
              mse=False, perchannel=True):
    """GPTQ for an ONNX MatMul weight ``W`` [in, out] (rows are input channels) with input Hessian ``H`` [in, in]:
    a drop-in for onnxruntime's ``neural_compressor.weight_only.gptq`` (same arguments, fake-quantized result).

    onnxruntime 1.32's port transposed the weight but kept the reference's indexing of the inverse Hessian's
    Cholesky factor: it reads a column of the upper-triangular factor (``Hinv1[i:, i]``, zero below the
    diagonal) where the algorithm needs a row (``Hinv1[i, i:]``), so no quantization error is ever fed forward
    and its "GPTQ" equals per-group round-to-nearest bit for bit (tests/backends/test_onnx_calibrated.py keeps
    checking that). This is the reference algorithm (Frantar et al., lazy batch updates) in row form; group
    scales and zero points come from the error-updated rows, as in the reference with ``static_groups=False``.
    """
    import numpy as np

    if actorder or mse or not perchannel:
        raise BackendError("gptq_rows implements GPTQ without act-order, MSE grids or per-tensor scales",
                           fix="use the recipe's defaults")
    W = np.array(W, dtype=np.float64)  # noqa: N806
    H = np.array(H, dtype=np.float64)  # noqa: N806
    n = W.shape[0]
    maxq = 2**num_bits - 1
    group_size = n if group_size == -1 else group_size
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead, :] = 0
    H[np.arange(n), np.arange(n)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # noqa: N806  upper triangular
    Q = np.zeros_like(W)  # noqa: N806
    scale = zero = None

    def params(rows):
        low, high = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if scheme == "sym":
            high = np.maximum(-low, high)
            low = np.where(low < 0, -high, low)
        flat = (low == 0) & (high == 0)
        low, high = np.where(flat, -1, low), np.where(flat, 1, high)
        s = (high - low) / maxq
        z = np.full_like(s, (maxq + 1) / 2) if scheme == "sym" else np.round(-low / s)
        return s, z

    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[i1:i2].copy()  # noqa: N806
        err = np.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                # the group's rows as updated so far (those past this block only by earlier blocks)
                stop = i1 + i + group_size
                rows = np.concatenate([W1[i:], W[i2:stop]]) if stop > i2 else W1[i:i + group_size]
                scale, zero = params(rows)
            q = scale * (np.clip(np.round(W1[i] / scale) + zero, 0, maxq) - zero)
            Q[i1 + i] = q
            err[i] = (W1[i] - q) / U[i1 + i, i1 + i]
            W1[i:] -= np.outer(U[i1 + i, i1 + i:i2], err[i])
        W[i2:] -= U[i1:i2, i2:].T @ err
    return Q.astype(np.float32)
