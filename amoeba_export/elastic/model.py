"""The elastic model: one set of (importance-permuted) weights, any subnet shape per forward.

A subnet's forward runs real, smaller matrix multiplies on weight prefixes. Query heads are kept in a
*slot-major* layout (head ``j * n_kv + g`` is slot ``j`` of KV group ``g``) so that keeping ``s`` slots per
group is a contiguous prefix and the result stays a valid grouped-query-attention layer; extraction
converts back to transformers' group-major order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import architecture
from ..reconstruct import ChannelRefit, Compensator, DepthMaps, DepthReconstruction
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
        # Qwen3: per-head RMSNorm over head_dim on queries and keys before RoPE. Its weight is shared by all
        # heads, so slicing heads leaves it whole (None for architectures without it).
        self.q_norm: nn.Module | None = getattr(attn, "q_norm", None)
        self.k_norm: nn.Module | None = getattr(attn, "k_norm", None)
        self.head_dim = dims.head_dim
        self.scaling = dims.head_dim ** -0.5
        # Per projection ("o_proj", "down_proj"): how a narrowed layer makes up for its removed input channels
        # (set by a plan; see amoeba_export.reconstruct.channels). Empty: removed channels are simply dropped.
        self.compensators: dict[str, Compensator] = {}

    def projections(self) -> dict[str, ElasticLinear]:
        return {name: getattr(self, name) for name in PROJECTIONS}

    def output_projection(self, name: str, kept: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [out, kept], bias or None)`` of ``o_proj``/``down_proj`` keeping ``kept`` input channels:
        sliced, LoRA-merged, refit by the compensator, the projection's own bias plus the compensation bias.
        Extraction writes exactly these; the forward computes the same function."""
        lin: ElasticLinear = getattr(self, name)
        refit = self._refit(name, kept)
        if refit is None:
            return lin.effective_weight(None, kept), lin.bias
        w_full = lin.effective_weight()
        weight, extra = refit.weight(w_full, kept), refit.bias(w_full)
        bias = lin.bias if extra is None else (extra if lin.bias is None else lin.bias + extra)
        return weight, bias

    def _refit(self, name: str, kept: int) -> ChannelRefit | None:
        """The compensator's refit when ``name`` loses input channels (None: nothing to make up for)."""
        comp = self.compensators.get(name)
        return comp.refit(kept) if comp is not None and kept < getattr(self, name).in_features else None

    def _project(self, name: str, x: torch.Tensor, kept: int) -> torch.Tensor:
        lin: ElasticLinear = getattr(self, name)
        refit = self._refit(name, kept)
        if refit is not None and refit.projection is not None:
            weight, bias = self.output_projection(name, kept)
            return lin.linear(x, weight, bias)
        y = lin(x, None, kept)  # the adapter's own (unmerged) path, as training runs it
        if refit is not None:
            y = y + refit.bias(lin.effective_weight())
        return y

    def sublayers(self, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor], width: LayerWidth,
                  *, layer: int = -1, observe: Observer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(residual after attention, MLP output)``: the layer's output is their sum."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, seq, _ = x.shape
        hd = self.head_dim
        q_dim, kv_dim = width.q_heads * hd, width.kv_heads * hd
        h = self.input_layernorm(x)
        q = self.q_proj(h, q_dim).view(bsz, seq, width.q_heads, hd)
        k = self.k_proj(h, kv_dim).view(bsz, seq, width.kv_heads, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
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
        y = x + self._project("o_proj", a, q_dim)
        h = self.post_attention_layernorm(y)
        m = self.act_fn(self.gate_proj(h, width.mlp)) * self.up_proj(h, width.mlp)
        if observe is not None:
            observe("mlp_in", layer, m)
        return y, self._project("down_proj", m, width.mlp)

    def forward(self, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor], width: LayerWidth,
                *, layer: int = -1, observe: Observer | None = None,
                mlp_map: torch.Tensor | None = None) -> torch.Tensor:
        """``mlp_map``: a depth map ``T`` applied to the MLP output (standing in for removed layers after it)."""
        y, d = self.sublayers(x, pos, width, layer=layer, observe=observe)
        if mlp_map is not None:
            d = F.linear(d, mlp_map.to(d.dtype))
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
        self.compensation_mode = "none"
        self.depth_reconstruction: DepthReconstruction | None = None
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
        if block.compensators:
            raise ValueError("reorder a layer before setting its compensation (its statistics are in plan order)")

    def set_compensation(self, compensators: Sequence[dict[str, Compensator]] | None, mode: str = "none") -> None:
        """Per layer, the compensators of its o_proj/down_proj (importance order), or None for none."""
        for i, block in enumerate(self.layers):
            block.compensators = {} if compensators is None else dict(compensators[i])
        self.compensation_mode = mode if compensators is not None else "none"

    @property
    def compensating(self) -> bool:
        """Whether narrowed layers get compensation biases (what extraction's bias flags follow)."""
        return any(b.compensators for b in self.layers)

    def set_depth_reconstruction(self, reconstruction: DepthReconstruction | None) -> None:
        """Fit a linear map per run of removed layers (on these calibration rows) whenever a shape runs."""
        self.depth_reconstruction = reconstruction

    @contextmanager
    def without_depth_maps(self) -> Iterator[None]:
        """Run shapes without their depth maps for a while (e.g. to rank many candidates cheaply)."""
        saved, self.depth_reconstruction = self.depth_reconstruction, None
        try:
            yield
        finally:
            self.depth_reconstruction = saved

    def depth_maps(self, shape: Shape) -> DepthMaps | None:
        """The shape's depth maps (fitted on first use, then cached), or None when reconstruction is off."""
        if self.depth_reconstruction is None or shape.depth == self.dims.num_layers:
            return None
        return self.depth_reconstruction.maps_for(self, shape)

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
                   layers: Sequence[int], observe: Observer | None = None,
                   maps: DepthMaps | None = None) -> torch.Tensor:
        mlp_maps = {} if maps is None else maps.maps
        for layer in layers:
            h = self.layers[layer](h, pos, widths[layer], layer=layer, observe=observe, mlp_map=mlp_maps.get(layer))
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    def forward(self, input_ids: torch.Tensor, shape: Shape | None = None,
                observe: Observer | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``shape`` (the full model when None), with the shape's depth maps
        when depth reconstruction is on. No padding support: sequences are packed to equal length."""
        shape = shape or self.full_shape()
        maps = self.depth_maps(shape)
        h, pos = self.embed(input_ids)
        h = self.run_layers(h, pos, self.widths(shape), shape.layers, observe, maps)
        return self.head(h)


def make_elastic(model: nn.Module) -> ElasticLM:
    """Wrap a stock HF causal LM (Llama, Mistral, Qwen2, Qwen3) as an elastic model. Takes over its modules."""
    architecture(getattr(model.config, "model_type", None), "plan",
                 fix="pass a stock Llama-family checkpoint (not an extracted subnet)")
    return ElasticLM(model).eval()
