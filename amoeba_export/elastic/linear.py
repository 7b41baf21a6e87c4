"""A linear layer that runs at any prefix width of its (importance-permuted) weight."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(Protocol):
    """A low-rank update that slices with the weight it adapts (see amoeba_export.finetune)."""

    def forward(self, x: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor: ...

    def delta_weight(self, out_features: int, in_features: int) -> torch.Tensor: ...


class ElasticLinear(nn.Module):
    """``y = x @ W[:out, :in].T + b[:out] (+ adapter)``: a real, smaller matmul, never a mask.

    Weights are frozen; importance ordering is applied once by permuting rows/columns in place, so the
    most important channels always form the prefix that a narrower shape keeps.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.adapter: nn.Module | None = None
        # Quantization-aware training (amoeba_export.finetune.qat.LinearFakeQuant): when set, every matmul runs
        # as ``fake_quant(x, weight, bias)`` on the effective (LoRA-merged) weight. None: plain matmuls.
        self.fake_quant: nn.Module | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor, out_features: int | None = None, in_features: int | None = None) -> torch.Tensor:
        out_f = self.out_features if out_features is None else out_features
        in_f = self.in_features if in_features is None else in_features
        if x.shape[-1] != in_f:
            x = x[..., :in_f]
        bias = None if self.bias is None else self.bias[:out_f]
        if self.fake_quant is not None:  # the export quantizes the merged weight, so QAT merges before rounding
            return self.fake_quant(x, self.effective_weight(out_f, in_f), bias)
        y = F.linear(x, self.weight[:out_f, :in_f], bias)
        if self.adapter is not None:
            y = y + self.adapter(x, out_f, in_f)
        return y

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` with ``weight`` standing in for this layer's (a compensator's refit of its effective
        weight), fake-quantized like :meth:`forward` during quantization-aware training."""
        return F.linear(x, weight, bias) if self.fake_quant is None else self.fake_quant(x, weight, bias)

    def effective_weight(self, out_features: int | None = None, in_features: int | None = None) -> torch.Tensor:
        """The weight slice with the adapter's update merged in (what extraction writes)."""
        out_f = self.out_features if out_features is None else out_features
        in_f = self.in_features if in_features is None else in_features
        weight = self.weight[:out_f, :in_f]
        if self.adapter is not None:
            weight = weight + self.adapter.delta_weight(out_f, in_f).to(weight.dtype)
        return weight

    @torch.no_grad()
    def permute_(self, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        if rows is not None:
            self.weight.data = self.weight.data[rows].contiguous()
            if self.bias is not None:
                self.bias.data = self.bias.data[rows].contiguous()
        if cols is not None:
            self.weight.data = self.weight.data[:, cols].contiguous()
