"""The elastic model: one set of (importance-permuted) weights, any subnet shape per forward.

A subnet's forward runs real, smaller matrix multiplies on weight prefixes. Query heads are kept in a
*slot-major* layout (head ``j * n_kv + g`` is slot ``j`` of KV group ``g``) so that keeping ``s`` slots per
group is a contiguous prefix and the result stays a valid grouped-query-attention layer; extraction
converts back to transformers' group-major order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..modelio import SUPPORTED_ARCHITECTURES
from ..shape import ModelDims, Shape
from .linear import ElasticLinear

# observe(kind, layer, tensor(s)): kinds "attn_in" (o_proj input), "mlp_in" (down_proj input),
# "block" ((layer input, layer output)); used for importance statistics and Block Influence.
Observer = Callable[[str, int, object], None]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerWidth:
    q_heads: int
    kv_heads: int
    mlp: int


class ElasticBlock(nn.Module):
    """One decoder layer with sliceable projections (weights shared with nothing else)."""

    def __init__(self, hf_layer: nn.Module, dims: ModelDims) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        for name, lin in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                          ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj),
                          ("down_proj", mlp.down_proj)):
            setattr(self, name, ElasticLinear(lin.weight, lin.bias))
        self.act_fn = mlp.act_fn
        self.head_dim = dims.head_dim
        self.scaling = dims.head_dim ** -0.5
        # Per-layer compensation: o_proj/down_proj input means of the removed channels (set by a plan).
        self.register_buffer("attn_in_mean", None, persistent=False)
        self.register_buffer("mlp_in_mean", None, persistent=False)

    def projections(self) -> dict[str, ElasticLinear]:
        return {name: getattr(self, name) for name in PROJECTIONS}

    def compensation(self, width: LayerWidth) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Output biases standing in for the removed channels' mean contribution (FLAP)."""
        attn_b = mlp_b = None
        kept_attn = width.q_heads * self.head_dim
        if self.attn_in_mean is not None and kept_attn < self.o_proj.in_features:
            w = self.o_proj.effective_weight()[:, kept_attn:]
            attn_b = w @ self.attn_in_mean[kept_attn:].to(w.dtype)
        if self.mlp_in_mean is not None and width.mlp < self.down_proj.in_features:
            w = self.down_proj.effective_weight()[:, width.mlp:]
            mlp_b = w @ self.mlp_in_mean[width.mlp:].to(w.dtype)
        return attn_b, mlp_b

    def forward(self, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor], width: LayerWidth,
                *, layer: int = -1, observe: Observer | None = None) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, seq, _ = x.shape
        hd = self.head_dim
        q_dim, kv_dim = width.q_heads * hd, width.kv_heads * hd
        h = self.input_layernorm(x)
        q = self.q_proj(h, q_dim).view(bsz, seq, width.q_heads, hd).transpose(1, 2)
        k = self.k_proj(h, kv_dim).view(bsz, seq, width.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(h, kv_dim).view(bsz, seq, width.kv_heads, hd).transpose(1, 2)
        cos, sin = pos
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = width.q_heads // width.kv_heads
        if group > 1:  # slot-major heads: tiling KV heads pairs slot j of group g with KV head g
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, scale=self.scaling)
        a = a.transpose(1, 2).reshape(bsz, seq, q_dim)
        if observe is not None:
            observe("attn_in", layer, a)
        attn_b, mlp_b = self.compensation(width)
        o = self.o_proj(a, None, q_dim)
        if attn_b is not None:
            o = o + attn_b
        y = x + o
        h = self.post_attention_layernorm(y)
        m = self.act_fn(self.gate_proj(h, width.mlp)) * self.up_proj(h, width.mlp)
        if observe is not None:
            observe("mlp_in", layer, m)
        d = self.down_proj(m, None, width.mlp)
        if mlp_b is not None:
            d = d + mlp_b
        out = y + d
        if observe is not None:
            observe("block", layer, (x, out))
        return out


class ElasticLM(nn.Module):
    """A causal LM that runs any :class:`Shape` of its source model. Built by :func:`make_elastic`."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        config = hf_model.config
        self.config = config
        self.dims = ModelDims.from_config(config)
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = hf_model.lm_head
        self.layers = nn.ModuleList(ElasticBlock(layer, self.dims) for layer in base.layers)
        for block in self.layers:
            self._to_slot_major(block)
        for p in self.parameters():
            p.requires_grad_(False)

    # -- layout -------------------------------------------------------------------------------------
    def _head_channels(self, heads: torch.Tensor) -> torch.Tensor:
        hd = self.dims.head_dim
        return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)

    def group_major_heads(self, q_heads: int, kv_heads: int) -> torch.Tensor:
        """Internal (slot-major) head index for each head of transformers' group-major layout."""
        slots = q_heads // kv_heads
        n_kv = kv_heads
        return torch.tensor([j * n_kv + g for g in range(n_kv) for j in range(slots)], dtype=torch.long)

    def _to_slot_major(self, block: ElasticBlock) -> None:
        d = self.dims
        if d.group_size == 1:
            return
        # transformers: head g*G + j (group g, slot j) -> ours: j*n_kv + g
        src = torch.tensor([g * d.group_size + j for j in range(d.group_size) for g in range(d.num_kv_heads)])
        ch = self._head_channels(src)
        block.q_proj.permute_(rows=ch)
        block.o_proj.permute_(cols=ch)

    @torch.no_grad()
    def reorder_(self, layer: int, *, heads: torch.Tensor, mlp: torch.Tensor) -> None:
        """Permute one layer so ``heads`` (internal order) and ``mlp`` channels come first."""
        block = self.layers[layer]
        ch = self._head_channels(heads)
        block.q_proj.permute_(rows=ch)
        block.o_proj.permute_(cols=ch)
        if self.dims.group_size == 1:  # MHA: a head is a KV head too
            block.k_proj.permute_(rows=ch)
            block.v_proj.permute_(rows=ch)
        block.gate_proj.permute_(rows=mlp)
        block.up_proj.permute_(rows=mlp)
        block.down_proj.permute_(cols=mlp)
        for name, perm in (("attn_in_mean", ch), ("mlp_in_mean", mlp)):
            buf = getattr(block, name)
            if buf is not None:
                setattr(block, name, buf[perm])

    def set_compensation(self, attn_means: Sequence[torch.Tensor] | None,
                         mlp_means: Sequence[torch.Tensor] | None) -> None:
        """Turn bias compensation on (per-layer input means, internal order) or off (None)."""
        for i, block in enumerate(self.layers):
            block.attn_in_mean = None if attn_means is None else attn_means[i].float()
            block.mlp_in_mean = None if mlp_means is None else mlp_means[i].float()

    @property
    def compensating(self) -> bool:
        return any(b.attn_in_mean is not None or b.mlp_in_mean is not None for b in self.layers)

    # -- forward ------------------------------------------------------------------------------------
    def full_shape(self) -> Shape:
        return Shape.full(self.dims)

    def widths(self, shape: Shape) -> dict[int, LayerWidth]:
        return {layer: LayerWidth(q, kv, m)
                for layer, q, kv, m in zip(shape.layers, shape.q_heads, shape.kv_heads, shape.mlp)}

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return h, self.rotary_emb(h, position_ids=positions)

    def run_layers(self, h: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor], widths: dict[int, LayerWidth],
                   layers: Sequence[int], observe: Observer | None = None) -> torch.Tensor:
        for layer in layers:
            h = self.layers[layer](h, pos, widths[layer], layer=layer, observe=observe)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    def forward(self, input_ids: torch.Tensor, shape: Shape | None = None,
                observe: Observer | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``shape`` (the full model when None). No padding support:
        sequences are packed to equal length."""
        shape = shape or self.full_shape()
        h, pos = self.embed(input_ids)
        h = self.run_layers(h, pos, self.widths(shape), shape.layers, observe)
        return self.head(h)


def make_elastic(model: nn.Module) -> ElasticLM:
    """Wrap a stock HF causal LM (Llama, Mistral, Qwen2) as an elastic model. Takes over its modules."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES or model_type == "amoeba_llama":
        supported = ", ".join(sorted(set(SUPPORTED_ARCHITECTURES) - {"amoeba_llama"}))
        raise UnsupportedArchitectureError(
            f"cannot make a {model_type!r} model elastic; supported are: {supported}",
            fix="pass a stock Llama-family checkpoint (not an extracted subnet)",
        )
    return ElasticLM(model).eval()
