"""File size of a subnet's exported artifact, predicted from its tensor list and the quant scheme.

``subnet_tensors`` lists exactly the tensors extraction writes for a shape (names, shapes, which biases
exist) without touching weights. Each backend's ``weight_bytes`` then prices every tensor under the
target's quant scheme: GGUF replays llama.cpp's per-tensor type choice (k-quant mixtures, block-size
fallbacks) and its 32-byte alignment exactly; ONNX and ExecuTorch price packed integers, scales and
zero points per group. What no formula holds — headers, tokenizer, graph/flatbuffer structure — is one
affine correction fitted on calibration exports (``size = c0 + c1 · weight_bytes``, see calibrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..architectures import subnet_class
from ..shape import ModelDims, Shape


@dataclass(frozen=True)
class Tensor:
    name: str  # HF name
    shape: tuple[int, ...]  # (out, in) for weights, (n,) for norms/biases
    layer: int | None = None  # index in the extracted model

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def kind(self) -> str:
        """The weight's role: embed, head, q, k, v, o, gate, up, down, or 'vector' for 1-D tensors."""
        if len(self.shape) == 1:
            return "vector"
        if self.name.startswith("model.embed_tokens"):
            return "embed"
        if self.name.startswith("lm_head"):
            return "head"
        return self.name.split(".")[-2].split("_")[0]


def subnet_tensors(dims: ModelDims, shape: Shape, *, model_type: str = "llama", compensate: bool = True,
                   qkv_bias: bool = False) -> list[Tensor]:
    """Every tensor ``amoeba_export.extract.write_subnet`` writes for ``shape`` (mirrors its bias rules)."""
    h, hd = dims.hidden_size, dims.head_dim
    full_q, full_m = dims.num_heads, dims.intermediate_size
    o_bias = compensate and any(q < full_q for q in shape.q_heads)
    down_bias = compensate and any(m < full_m for m in shape.mlp)
    # The class extraction writes (architectures.subnet_class): a stock Llama holding compensation biases through
    # attention_bias/mlp_bias gets zero biases everywhere those flags reach.
    stock_bias = subnet_class(model_type, uniform=shape.uniform, hidden_size=h, q_heads=max(shape.q_heads),
                              output_bias=o_bias or down_bias).bias_flags
    attn_all = stock_bias or qkv_bias or dims.qkv_bias
    out = [Tensor("model.embed_tokens.weight", (dims.vocab_size, h)), Tensor("model.norm.weight", (h,))]
    if not dims.tied_embeddings:
        out.append(Tensor("lm_head.weight", (dims.vocab_size, h)))
    for i, (q, kv, m) in enumerate(zip(shape.q_heads, shape.kv_heads, shape.mlp)):
        p = f"model.layers.{i}."
        out += [Tensor(p + "input_layernorm.weight", (h,), i), Tensor(p + "post_attention_layernorm.weight", (h,), i),
                Tensor(p + "self_attn.q_proj.weight", (q * hd, h), i),
                Tensor(p + "self_attn.k_proj.weight", (kv * hd, h), i),
                Tensor(p + "self_attn.v_proj.weight", (kv * hd, h), i),
                Tensor(p + "self_attn.o_proj.weight", (h, q * hd), i),
                Tensor(p + "mlp.gate_proj.weight", (m, h), i), Tensor(p + "mlp.up_proj.weight", (m, h), i),
                Tensor(p + "mlp.down_proj.weight", (h, m), i)]
        if dims.qk_norm:
            out += [Tensor(p + f"self_attn.{n}_norm.weight", (hd,), i) for n in ("q", "k")]
        if attn_all:
            out += [Tensor(p + f"self_attn.{n}_proj.bias", (size,), i)
                    for n, size in (("q", q * hd), ("k", kv * hd), ("v", kv * hd))]
        if o_bias or (stock_bias and attn_all):
            out.append(Tensor(p + "self_attn.o_proj.bias", (h,), i))
        if stock_bias and down_bias:
            out += [Tensor(p + "mlp.gate_proj.bias", (m,), i), Tensor(p + "mlp.up_proj.bias", (m,), i)]
        if down_bias:
            out.append(Tensor(p + "mlp.down_proj.bias", (h,), i))
    return out


# -- GGUF: llama.cpp's quantizer, replayed ---------------------------------------------------------------
GGUF_ALIGN = 32
GGUF_DEFAULT_TYPE = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K",
                     "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
GGUF_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # for rows the 256-block types cannot hold


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensor_type(t: Tensor, quant: str, n_layers: int, tied: bool, *, imatrix: bool = False) -> str:
    """The GGML type llama.cpp's ``llama_tensor_get_type`` gives this tensor (llama arch; ``imatrix``: quantized
    with an importance matrix, which makes Q4_0's first eighth of ffn_down Q4_1)."""
    import gguf

    default = GGUF_DEFAULT_TYPE[quant]
    if t.kind == "vector":
        return "F32"
    if quant in ("F32", "F16"):
        return quant
    block = lambda name: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]  # noqa: E731
    ne0 = t.shape[-1]
    new = default
    if t.kind == "head" or (tied and t.kind == "embed"):
        new = "Q8_0" if ne0 % block(default) else ("Q6_K" if default != "Q8_0" else "Q8_0")
    elif t.kind == "v" and quant in ("Q4_K_M", "Q5_K_M") and _use_more_bits(t.layer, n_layers):
        new = "Q6_K"
    elif t.kind == "down" and quant == "Q4_K_M" and _use_more_bits(t.layer, n_layers):
        new = "Q6_K"
    elif t.kind == "down" and quant == "Q5_K_M" and _use_more_bits(t.layer, n_layers):
        new = "Q6_K"
    elif t.kind == "down" and quant == "Q4_0" and imatrix and t.layer < n_layers // 8:
        new = "Q4_1"  # llama.cpp's guard against "craziness in the first few ffn_down layers" with an imatrix
    if ne0 % block(new):
        new = GGUF_FALLBACK.get(new, new)
        if ne0 % block(new):
            new = "F16"
    return new


def gguf_tensor_bytes(t: Tensor, ggml_type: str) -> int:
    import gguf

    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    rows = t.numel // t.shape[-1]
    return rows * (t.shape[-1] // blk) * size


def _gguf_name_bytes(t: Tensor) -> int:
    # Tensor info: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32), offset (u64).
    name = t.name.replace("model.layers.", "blk.")  # length differs from the GGUF name by a constant per kind
    return 8 + len(name) + 4 + 8 * len(t.shape) + 4 + 8


def gguf_weight_bytes(tensors: list[Tensor], quant: str, *, tied: bool, imatrix: bool = False) -> int:
    n_layers = 1 + max((t.layer for t in tensors if t.layer is not None), default=0)
    total = 0
    for t in tensors:
        data = gguf_tensor_bytes(t, gguf_tensor_type(t, quant, n_layers, tied, imatrix=imatrix))
        total += -(-data // GGUF_ALIGN) * GGUF_ALIGN + _gguf_name_bytes(t)
    return total


# -- ONNX: onnxruntime MatMulNBits / dynamic int8 ----------------------------------------------------------
def _nbits_bytes(out_f: int, in_f: int, bits: int, block: int, symmetric: bool) -> int:
    blocks = -(-in_f // block)
    zero_points = 0 if symmetric else out_f * -(-blocks * bits // 8)
    return out_f * blocks * block * bits // 8 + 4 * out_f * blocks + zero_points


def onnx_weight_bytes(tensors: list[Tensor], quant: str, *, tied: bool, options: dict | None = None) -> int:
    from ..backends.onnx.quantize import recipe_for

    r = recipe_for(quant, dict(options or {}))
    items = list(tensors)
    if tied and r.method != "none":
        # The exported graph carries an untied lm_head (Gather cannot read MatMulNBits blocks).
        items.append(Tensor("lm_head.weight", next(t.shape for t in tensors if t.kind == "embed")))
    total = 0
    for t in items:
        module = t.name.rsplit(".", 1)[0]
        if t.kind == "vector" or r.method == "none" or any(module.endswith(x) for x in r.exclude):
            total += 4 * t.numel
        elif t.kind == "embed":
            total += _nbits_bytes(*t.shape, 4, r.block_size, r.symmetric) if r.quantize_embedding else 4 * t.numel
        elif r.method == "dynamic":
            total += t.numel + 5 * t.shape[0]
        else:
            bits = 8 if any(module.endswith(x) for x in r.keep_8bit) else r.bits
            total += _nbits_bytes(*t.shape, bits, r.block_size, r.symmetric)
    return total


# -- ExecuTorch: torchao recipes lowered to XNNPACK --------------------------------------------------------
def executorch_weight_bytes(tensors: list[Tensor], quant: str, *, tied: bool) -> int:
    from ..backends.executorch.recipes import RECIPES, _fallback_group

    recipe = RECIPES[quant.lower()]
    total = 0
    items = list(tensors)
    if tied and recipe.head is not None:
        items.append(Tensor("lm_head.weight", next(t.shape for t in tensors if t.kind == "embed")))
    for t in items:
        if t.kind == "vector":
            total += 4 * t.numel
            continue
        if t.kind == "embed":
            total += t.numel + 4 * t.shape[0] if recipe.embedding == "int8" else 4 * t.numel
            continue
        scheme = recipe.scheme_for("lm_head" if t.kind == "head" else t.name.removesuffix(".weight"))
        out_f, in_f = t.shape
        if scheme is None:
            total += 4 * t.numel
            continue
        group = recipe.group_size if scheme == "8da4w" else None
        if group and in_f % group:
            group = _fallback_group(in_f, group)
            scheme = scheme if group else "8da8w"
        if scheme == "8da4w":
            total += t.numel // 2 + 2 * out_f * (in_f // group)  # packed nibbles + bf16 scales per group
        else:
            total += t.numel + 4 * out_f  # int8 + fp32 per-channel scale
    return total


def weight_bytes(backend: str, quant: str, dims: ModelDims, shape: Shape, *, model_type: str = "llama",
                 compensate: bool = True, export_options: dict | None = None) -> int:
    """The backend's priced weights of ``shape`` (before the calibrated affine correction)."""
    tensors = subnet_tensors(dims, shape, model_type=model_type, compensate=compensate)
    if backend == "gguf":
        from ..backends.gguf.quantize import CALIBRATED

        imatrix = quant in CALIBRATED and (export_options or {}).get("imatrix", "auto") != "off"
        return gguf_weight_bytes(tensors, quant, tied=dims.tied_embeddings, imatrix=imatrix)
    if backend == "onnx":
        return onnx_weight_bytes(tensors, quant, tied=dims.tied_embeddings, options=export_options)
    if backend == "executorch":
        return executorch_weight_bytes(tensors, quant, tied=dims.tied_embeddings)
    return 4 * sum(t.numel for t in tensors)


def kv_cache_bytes(backend: str, shape: Shape, head_dim: int, context: int) -> int:
    """KV cache at ``context`` tokens: llama.cpp keeps f16, ExecuTorch and onnxruntime fp32."""
    per = 2 if backend == "gguf" else 4
    return sum(2 * kv * head_dim * context * per for kv in shape.kv_heads)
