"""The decoder graph: a causal LM with its KV cache as explicit, optimum/onnxruntime-genai-named tensors.

Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``; outputs
``logits`` and ``present.N.key/value`` (each ``[batch, kv_heads_N, past + seq, head_dim]``). Per-layer
KV-head counts are simply per-layer tensor shapes, so subnets with per-layer widths need nothing special.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Example sizes for tracing: batch 2 and past 3, because torch.export specialises a size-1 (or 0)
# example dimension to that constant, silently fixing the graph to batch 1 (reference failure #8).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 3
OPSET = 18


@dataclass(frozen=True)
class CacheLayout:
    """Per-layer KV-cache widths of the exported graph (what the runner must feed)."""

    kv_heads: tuple[int, ...]
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> CacheLayout:
        n = config.num_hidden_layers
        per_layer = getattr(config, "layer_num_key_value_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(tuple(per_layer) if per_layer else (kv,) * n, head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def empty(self, batch: int, length: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(batch, h, length, self.head_dim, dtype=dtype) for h in self.kv_heads for _ in (0, 1)]


class DecoderWithPast(torch.nn.Module):
    """Wraps an HF causal LM so that the KV cache is a flat tuple of tensors in and out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layout = CacheLayout.from_config(model.config)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example_inputs(layout: CacheLayout, vocab_size: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g)
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_SEQ, dtype=torch.int64)
    pos = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_SEQ).expand(EXAMPLE_BATCH, -1).contiguous()
    past = tuple(0.1 * t.normal_(generator=g) for t in layout.empty(EXAMPLE_BATCH, EXAMPLE_PAST))
    return ids, mask, pos, past


def dynamic_shapes(layout: CacheLayout) -> dict[str, Any]:
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1, max=1024), dim("sequence_length", min=1, max=1 << 17)
    # Dim.DYNAMIC lets the exporter express past (0 allowed) and total length as derived symbols.
    past_len = dim.DYNAMIC
    total = dim.DYNAMIC
    kv = {0: batch, 2: past_len}
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple(kv for _ in range(2 * layout.num_layers)),
    }


def export_decoder(model: torch.nn.Module, path: Path, *, external_data: bool) -> dict[str, Any]:
    """Export ``model`` to ``path`` (one .onnx, plus ``<name>.data`` when ``external_data``)."""
    wrapper = DecoderWithPast(model).eval()
    layout = wrapper.layout
    inputs = example_inputs(layout, model.config.vocab_size)
    names = ["input_ids", "attention_mask", "position_ids", *layout.input_names()]
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, inputs, dynamo=True, opset_version=OPSET, input_names=names,
            output_names=["logits", *layout.output_names()], dynamic_shapes=dynamic_shapes(layout),
            verbose=False,
        )
    program.save(str(path), external_data=external_data)
    return {"opset": OPSET, "inputs": names, "num_layers": layout.num_layers, "kv_heads": list(layout.kv_heads),
            "head_dim": layout.head_dim}


def _module_path(node) -> str | None:
    """The HF module a node came from (``model.layers.3.mlp.down_proj``), from the exporter's metadata."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 3:
                path = scopes[-2]  # the last entry is the aten op itself
                return path.removeprefix("model.")  # the wrapper's own attribute
    return None


def _is_weight_op(node) -> bool:
    """Whether the node computes an nn.Linear or nn.Embedding (a tied lm_head reads its weight via Transpose)."""
    fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
    return "aten.linear" in fx or "aten.embedding" in fx


def tidy(path: Path, *, external_data: bool) -> dict[str, str]:
    """Name weight nodes after their HF module, drop source stack traces, give the dims stable names.

    Node names let quantization recipes say ``lm_head`` or ``down_proj`` instead of ``node_linear_213``;
    the dim names are the ones optimum and onnxruntime-genai print. Returns node name -> module path.
    """
    import onnx

    model = onnx.load(str(path))
    roles: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Gather") and _is_weight_op(node):
            module = _module_path(node)
            if module:
                node.name = f"/{module.replace('.', '/')}/{node.op_type}"
                roles[node.name] = module
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    dims = {"past_key_values.": "past_sequence_length", "present.": "total_sequence_length",
            "attention_mask": "total_sequence_length"}
    for value in (*model.graph.input, *model.graph.output):
        for prefix, dim_name in dims.items():
            if value.name.startswith(prefix):
                axis = 2 if prefix != "attention_mask" else 1
                value.type.tensor_type.shape.dim[axis].dim_param = dim_name
    if external_data:
        data = path.name + ".data"
        (path.parent / data).unlink(missing_ok=True)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                  size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return roles
