"""SMoL on an elastic model: LoRA experts on every adapted linear, one shape-conditioned gate for all.

The gate sees only the shape (kept-layer mask ⊕ one-hot width choice), so its output is a constant per
shape: at evaluation and extraction it is deterministic and ΔW can be merged once per shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..elastic import ElasticLinear, ElasticLM
from ..shape import ModelDims, Shape
from .config import SMoLConfig
from .layer import SMoLLoRA


def width_choice(shape: Shape, dims: ModelDims, ratios: Sequence[float]) -> int:
    """Index of the shape's width ratio in ``ratios``: the plan's recorded ratio when present, else the
    ratio nearest to the fraction of prunable width parameters the kept layers keep."""
    recorded = shape.meta.get("width") if shape.meta else None
    if recorded is not None:
        return min(range(len(ratios)), key=lambda i: abs(ratios[i] - float(recorded)))
    h, hd = dims.hidden_size, dims.head_dim
    full = h * hd * (2 * dims.num_heads + 2 * dims.num_kv_heads) + 3 * h * dims.intermediate_size
    kept = sum(h * hd * (2 * q + 2 * kv) + 3 * h * m for q, kv, m in zip(shape.q_heads, shape.kv_heads, shape.mlp))
    frac = kept / (full * max(1, shape.depth))
    return min(range(len(ratios)), key=lambda i: abs(ratios[i] - frac))


class ShapeGate(nn.Module):
    """Shape encoding → small MLP → (noisy during training) top-k softmax over the experts."""

    def __init__(self, dims: ModelDims, config: SMoLConfig) -> None:
        super().__init__()
        self.dims = dims
        self.ratios = tuple(config.width_ratios)
        self.experts, self.top_k, self.noisy = config.experts, config.top_k, config.noisy_gate
        n_in = dims.num_layers + len(self.ratios)
        self.net = nn.Sequential(nn.Linear(n_in, config.gate_hidden), nn.ReLU(),
                                 nn.Linear(config.gate_hidden, config.experts))
        # Shazeer et al.'s noisy top-k: a learnt, softplus-scaled noise level per expert.
        self.noise = nn.Linear(n_in, config.experts)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)

    def encode(self, shape: Shape) -> torch.Tensor:
        z = torch.zeros(self.dims.num_layers + len(self.ratios))
        z[list(shape.layers)] = 1.0
        z[self.dims.num_layers + width_choice(shape, self.dims, self.ratios)] = 1.0
        return z.to(self.net[0].weight.device, self.net[0].weight.dtype)

    def forward(self, shape: Shape, noise_seed: int | None = None) -> torch.Tensor:
        """Expert weights ``[E]`` (zeros outside the top-k). Noise only in training mode."""
        z = self.encode(shape)
        logits = self.net(z)
        if self.training and self.noisy:
            gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
            eps = torch.randn(self.experts, generator=gen).to(logits)
            logits = logits + eps * F.softplus(self.noise(z))
        top, idx = torch.topk(logits, self.top_k)
        return torch.zeros_like(logits).scatter(0, idx, torch.softmax(top, dim=0))


def adapted_linears(elastic: ElasticLM, targets: Sequence[str]) -> Iterator[tuple[str, ElasticLinear]]:
    for i, block in enumerate(elastic.layers):
        for name, lin in block.projections().items():
            if name in targets:
                yield f"layers.{i}.{name}", lin


def attach_adapters(elastic: ElasticLM, config: SMoLConfig, *, seed: int = 0) -> list[SMoLLoRA]:
    """Put a fresh SMoL adapter on every targeted linear (after the plan's permutation)."""
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for _, lin in adapted_linears(elastic, config.targets):
        if lin.adapter is not None:
            raise RuntimeError("this elastic model already has adapters")
        ad = SMoLLoRA(lin.in_features, lin.out_features, experts=config.experts, rank=config.rank,
                      scaling=config.scaling, generator=gen)
        lin.adapter = ad.to(lin.weight.device)
        adapters.append(ad)
    return adapters


def model_adapters(elastic: ElasticLM) -> list[SMoLLoRA]:
    return [m for m in elastic.modules() if isinstance(m, SMoLLoRA)]


def set_mix(elastic: ElasticLM, mix: torch.Tensor | None) -> None:
    for ad in model_adapters(elastic):
        ad.mix = mix


class SMoLModel(nn.Module):
    """The trainable wrapper: frozen elastic base + adapters + gate. ``forward`` runs several shapes."""

    def __init__(self, elastic: ElasticLM, config: SMoLConfig, *, seed: int = 0,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.elastic = elastic
        attach_adapters(elastic, config, seed=seed)
        torch.manual_seed(seed)  # the gate's init; every rank builds the same gate
        self.gate = ShapeGate(elastic.dims, config) if config.experts > 1 else None
        # A plain reference (not a submodule: that would make a module cycle) for merge_for_shape.
        object.__setattr__(elastic, "_smol_gate", self.gate)
        self.gradient_checkpointing = gradient_checkpointing

    def mix_for(self, shape: Shape, noise_seed: int | None = None) -> torch.Tensor | None:
        return None if self.gate is None else self.gate(shape, noise_seed)

    def run_shape(self, input_ids: torch.Tensor, shape: Shape, noise_seed: int | None = None) -> torch.Tensor:
        set_mix(self.elastic, self.mix_for(shape, noise_seed))
        el = self.elastic
        h, pos = el.embed(input_ids)
        widths = el.widths(shape)
        for layer in shape.layers:
            block = el.layers[layer]
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, pos, widths[layer], use_reentrant=False)
            else:
                h = block(h, pos, widths[layer])
        return el.head(h)

    def forward(self, input_ids: torch.Tensor, shapes: Sequence[Shape],
                noise_seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Logits of each shape (one DDP forward for all of them, so one backward syncs once)."""
        seeds = list(noise_seeds) if noise_seeds is not None else [None] * len(shapes)
        return [self.run_shape(input_ids, s, seed) for s, seed in zip(shapes, seeds)]

    # -- trainable state ----------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        bad = [n for n in own if n in tensors and tuple(tensors[n].shape) != tuple(own[n].shape)]
        if missing or extra or bad:
            from ..errors import CheckpointError

            detail = "; ".join(x for x in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                f"shape mismatch {bad[:3]}" if bad else "") if x)
            raise CheckpointError(f"adapter weights do not fit this model/SMoL config ({detail})",
                                  fix="resume with the config the checkpoint was trained with")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n].to(p.dtype))


@torch.no_grad()
def merge_for_shape(elastic: ElasticLM, shape: Shape) -> torch.Tensor | None:
    """Fix every adapter to the deterministic gate mix of ``shape``: afterwards
    ``ElasticLinear.effective_weight(out, in)`` returns the merged ``W + ΔW`` slice of that shape."""
    gate: ShapeGate | None = getattr(elastic, "_smol_gate", None)
    if gate is not None:
        gate.eval()
        mix = gate(shape).detach()
    else:
        mix = None
    set_mix(elastic, mix)
    return mix
