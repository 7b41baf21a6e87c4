"""The SMoL adapter: E LoRA experts on one elastic linear, mixed by the shared gate's weights.

Factors are stored full-size (``A: [E, r, in]``, ``B: [E, out, r]``) in the same (importance-permuted)
order as the weight they adapt, so a subnet's adapter is exactly the prefix slice of the full adapter,
exactly as the subnet's weight is the prefix slice of the full weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SMoLLoRA(nn.Module):
    """``ΔW = B·A·α/r`` with ``A = Σ gᵢAᵢ``, ``B = Σ gᵢBᵢ``; ``g`` (set per shape as :attr:`mix`)."""

    def __init__(self, in_features: int, out_features: int, *, experts: int, rank: int, scaling: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        # peft's init: A ~ kaiming-uniform(a=√5) so that ΔW starts at exactly zero through B = 0.
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(experts, rank, in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank))
        self.scaling = scaling
        # Gate weights of the shape being run ([E]); None = uniform (only valid with one expert).
        self.mix: torch.Tensor | None = None

    @property
    def experts(self) -> int:
        return self.lora_A.shape[0]

    def factors(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed, sliced ``(A [r, in], B [out, r])``."""
        a = self.lora_A[:, :, :in_features]
        b = self.lora_B[:, :out_features, :]
        if self.mix is None:
            if self.experts != 1:
                raise RuntimeError("SMoLLoRA.mix is unset; run the model through SMoLModel")
            return a[0], b[0]
        g = self.mix.to(a.dtype)
        return torch.einsum("e,eri->ri", g, a), torch.einsum("e,eor->or", g, b)

    def forward(self, x: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
        a, b = self.factors(out_features, in_features)
        # Two thin matmuls; never materialises ΔW during training.
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scaling

    def delta_weight(self, out_features: int, in_features: int) -> torch.Tensor:
        a, b = self.factors(out_features, in_features)
        return (b @ a) * self.scaling
