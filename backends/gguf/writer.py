"""Write a plain HF Llama-family folder as an F32 or F16 GGUF with gguf-py's GGUFWriter.

Uniform widths keep llama.cpp's ``llama`` architecture (widest tool support). Per-layer widths use ``deci``
(DeciLM / Nemotron-NAS), the llama.cpp architecture that reads per-layer head counts and FFN widths;
``llama`` sizes every layer from layer 0 and rejects such files. Which llama.cpp graph each HF architecture
becomes is the table in :mod:`amoeba_export.architectures`: Qwen2 is written as ``llama``/``deci`` too
(llama.cpp's ``qwen2`` graph reads one head count for all layers and no o_proj/down_proj bias, so it cannot
load pruned or compensated subnets), Qwen3 as ``qwen3`` (the only graph with q/k-norm weights). Tensors are
streamed one at a time (header and tensor infos first, then data), so a 7B model never sits in memory twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amoeba_export.architectures import ARCHITECTURES, ROPE_TYPES, qk_norm, rope_type, supported
from amoeba_export.errors import BackendError, CheckpointError

from ..meta import head_dim, layer_widths, read_hf_config
from .tokenizer import build_vocab

TENSOR_MAP = json.loads(Path(__file__).with_name("tensor_map.json").read_text())
ROPE_FREQS = "rope_freqs.weight"
# llama.cpp graph -> whether its RoPE pairs adjacent rows (llama, deci: Q/K rows are permuted from HF's
# rotate-half layout) or rotates halves as HF does (NEOX style: qwen3, rows written as they are).
GGUF_ROPE_PERMUTE: dict[str, bool] = {"llama": True, "deci": True, "qwen3": False}


@dataclass(frozen=True)
class GGUFPlan:
    """What to write: the architecture, the per-layer sizes and where each GGUF tensor comes from."""

    arch: str
    config: dict[str, Any]
    widths: dict[str, list[int]]
    tensors: dict[str, tuple[str, str]]  # gguf name -> (safetensors file, hf name)
    notes: tuple[str, ...]
    rope_freqs: tuple[float, ...] = ()  # llama3 RoPE: per-frequency divisors, written as rope_freqs.weight


def _weight_files(hf_dir: Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name (single file or a sharded index)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir} holds no .safetensors weights", fix="save the model with safetensors")
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                out.update(dict.fromkeys(fh.keys(), f.name))
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"cannot read {f}: {exc}", fix="re-create the checkpoint") from exc
    return out


def _gguf_name(hf_name: str, n_layers: int) -> str | None:
    if hf_name in TENSOR_MAP["global"]:
        return TENSOR_MAP["global"][hf_name]
    prefix = TENSOR_MAP["layer_prefix"]["hf"].split("{i}")[0]
    if hf_name.startswith(prefix):
        index, _, rest = hf_name[len(prefix):].partition(".")
        if index.isdigit() and int(index) < n_layers and rest in TENSOR_MAP["layer"]:
            return TENSOR_MAP["layer_prefix"]["gguf"].format(i=int(index)) + TENSOR_MAP["layer"][rest]
    return None


def plan_gguf(hf_dir: str | Path) -> GGUFPlan:
    """Check the folder and decide the architecture and tensor list; raises BackendError with every problem."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    problems, notes = [], []
    entry = ARCHITECTURES.get(cfg.get("model_type"))
    if entry is None or "gguf" not in entry.stages:
        problems.append(f"model_type {cfg.get('model_type')!r} (supported are: {', '.join(supported('gguf'))})")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} (llama.cpp's llama/deci/qwen3 graphs use silu)")
    if rope_type(cfg) not in ROPE_TYPES["gguf"]:
        problems.append(f"rope type {rope_type(cfg)!r} (supported are: {', '.join(ROPE_TYPES['gguf'])})")
    widths = layer_widths(cfg)
    for i, (q, m) in enumerate(zip(widths["q_heads"], widths["mlp"])):
        if m == 0 and q > 0:
            # deci treats a zero FFN width as "skip the whole block": attention would silently vanish.
            problems.append(f"layer {i} has attention but an MLP width of 0, which llama.cpp would skip entirely")
    uniform = all(len(set(v)) <= 1 for v in widths.values())
    arch = _gguf_arch(cfg, uniform, problems)
    if cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        notes.append(f"sliding window {cfg['sliding_window']} is not applied by llama.cpp's {arch} graph; "
                     "keep contexts within it")
    if problems:
        raise BackendError(f"{hf_dir} cannot be written as GGUF: " + "; ".join(problems),
                           fix="export it with the onnx or executorch backend")
    if entry is not None and entry.model_type == "qwen2":
        notes.append(f"written as llama.cpp's {arch} graph, not qwen2: the same function, and the only graphs that "
                     "load pruned per-layer heads and o_proj/down_proj biases")
    n_layers = int(cfg["num_hidden_layers"])
    tensors: dict[str, tuple[str, str]] = {}
    unknown = []
    for hf_name, file in sorted(_weight_files(hf_dir).items()):
        name = _gguf_name(hf_name, n_layers)
        if name is None:
            unknown.append(hf_name)
        else:
            tensors[name] = (file, hf_name)
    if unknown:
        raise BackendError(f"{len(unknown)} tensors have no GGUF name: {', '.join(unknown[:5])}",
                           fix="add them to backends/gguf/tensor_map.json if llama.cpp's graph uses them")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{hf_dir} has no model.embed_tokens.weight", fix="pass a complete checkpoint")
    if cfg.get("tie_word_embeddings") and "output.weight" in tensors:
        del tensors["output.weight"]  # llama.cpp falls back to token_embd, as the tied HF model does
    freqs = _llama3_rope_freqs(cfg) if rope_type(cfg) == "llama3" else ()
    return GGUFPlan(arch, cfg, widths, tensors, tuple(notes), freqs)


def gguf_limits(cfg: dict[str, Any]) -> list[str]:
    """Why llama.cpp has no graph for this (supported) architecture's folder: empty when it has one. These are
    llama.cpp's limits, not ours, so the pipeline reports them as "unsupported", never as a failure."""
    if not qk_norm(cfg):
        return []
    # q/k-norm weights exist only in llama.cpp's qwen3 graph, which reads one head count for all layers and
    # loads no o_proj/down_proj or MLP biases.
    out = []
    if not all(len(set(v)) <= 1 for v in layer_widths(cfg).values()):
        out.append("a Qwen3 subnet with per-layer widths (llama.cpp's qwen3 graph, the only one with q/k-norm "
                   "weights, reads one head count for all layers; extract with --mode uniform)")
    if biases := [k for k in ("o_proj_bias", "down_proj_bias", "attention_bias", "mlp_bias") if cfg.get(k)]:
        out.append(f"a Qwen3 model with {', '.join(biases)} (llama.cpp's qwen3 graph loads no such bias; "
                   "extract with --compensate none)")
    if rope_type(cfg) == "llama3":
        out.append("llama3 RoPE scaling on a Qwen3 model (llama.cpp's qwen3 graph reads no rope_freqs)")
    return out


def _gguf_arch(cfg: dict[str, Any], uniform: bool, problems: list[str]) -> str:
    """The llama.cpp graph for this folder (architectures.py's table), appending why when there is none."""
    entry = ARCHITECTURES.get(cfg.get("model_type"))
    if qk_norm(cfg):
        problems += gguf_limits(cfg)
        return "qwen3"
    return "llama" if entry is None else (entry.gguf_arch if uniform else entry.gguf_arch_per_layer)


def _llama3_rope_freqs(cfg: dict[str, Any]) -> tuple[float, ...]:
    """Llama 3.x RoPE scaling as llama.cpp takes it: one divisor per rotary frequency (rope_freqs.weight),
    computed exactly as llama.cpp's convert_hf_to_gguf.py does."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    base = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    dim = head_dim(cfg)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order → llama.cpp's interleaved RoPE pairs, head by head (weights and biases)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_hparams(writer, plan: GGUFPlan, name: str, file_type) -> None:
    import gguf

    cfg, widths = plan.config, plan.widths
    per_layer = plan.arch == "deci"
    writer.add_name(name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    # Arrays must hold plain Python ints: GGUFWriter rejects numpy integer types.
    writer.add_feed_forward_length(widths["mlp"] if per_layer else widths["mlp"][0])
    writer.add_head_count(widths["q_heads"] if per_layer else widths["q_heads"][0])
    writer.add_head_count_kv(widths["kv_heads"] if per_layer else widths["kv_heads"][0])
    # Head size is not per-layer; without explicit key/value lengths llama.cpp derives it from layer 0.
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_rope_dimension_count(head_dim(cfg))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
    if rope_type(cfg) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(file_type)


def _tensor_arrays(hf_dir: Path, plan: GGUFPlan, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """GGUF tensors in plan order, converted and permuted one at a time."""
    import torch
    from safetensors import safe_open

    permute = {k: v for k, v in TENSOR_MAP["rope_permute"].items() if k != "about" and GGUF_ROPE_PERMUTE[plan.arch]}
    layer_prefix = TENSOR_MAP["layer_prefix"]["hf"].split("{i}")[0]
    handles: dict[str, Any] = {}
    try:
        for gguf_name, (file, hf_name) in plan.tensors.items():
            if file not in handles:
                handles[file] = safe_open(str(hf_dir / file), framework="pt")
            arr = handles[file].get_tensor(hf_name).to(torch.float32).numpy()
            if hf_name.startswith(layer_prefix):
                index, _, rest = hf_name[len(layer_prefix):].partition(".")
                module = rest.rsplit(".", 1)[0]
                if module in permute:
                    arr = _permute_rows(arr, plan.widths[permute[module]][int(index)])
            # Norms and biases stay F32 (tiny, and llama.cpp adds them in F32 anyway).
            yield gguf_name, np.ascontiguousarray(arr.astype(np.float32 if arr.ndim == 1 else dtype))
    finally:
        handles.clear()
    if plan.rope_freqs:
        yield ROPE_FREQS, np.asarray(plan.rope_freqs, dtype=np.float32)


def write_gguf(hf_dir: str | Path, out_file: str | Path, *, dtype: str = "F32", name: str | None = None,
               pre_tokenizer: str | None = None, progress: bool = True) -> GGUFPlan:
    """Write ``hf_dir`` as one GGUF file of F32 or F16 weights (the quantizer's input)."""
    import gguf
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    plan = plan_gguf(hf_dir)
    np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}[dtype]
    vocab = build_vocab(hf_dir, int(plan.config["vocab_size"]), pre_tokenizer=pre_tokenizer)
    writer = gguf.GGUFWriter(str(out_file), arch=plan.arch)
    try:
        _write_hparams(writer, plan, name or hf_dir.name, file_type)
        vocab.write(writer)
        for gguf_name, (file, hf_name) in plan.tensors.items():
            with safe_open(str(hf_dir / file), framework="pt") as fh:
                shape = list(fh.get_slice(hf_name).get_shape())
            item = np.dtype(np.float32 if len(shape) == 1 else np_dtype)
            writer.add_tensor_info(gguf_name, shape, item, int(np.prod(shape)) * item.itemsize)
        if plan.rope_freqs:
            writer.add_tensor_info(ROPE_FREQS, [len(plan.rope_freqs)], np.dtype(np.float32), 4 * len(plan.rope_freqs))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(plan.tensors) + bool(plan.rope_freqs)
        for _, arr in tqdm(_tensor_arrays(hf_dir, plan, np_dtype), total=total, desc=f"write {dtype}",
                           unit="tensor", disable=not progress):
            writer.write_tensor_data(arr)
    finally:
        writer.close()
    return replace(plan, notes=plan.notes + vocab.notes)
