"""Quantization-aware elastic fine-tuning (``amoeba train --qat SCHEME``).

Every decoder linear that the ExecuTorch recipe ``SCHEME`` quantizes fake-quantizes, in each shape's forward, what
that recipe will quantize at export: its *effective* weight — the shape's slice with the LoRA delta merged in
(for a narrowed ``o_proj``/``down_proj`` under least-squares compensation, the refit weight) — and its input
activations:

- weights: int4 symmetric in groups of ``recipe.group_size`` along the input dimension (8da4w), or int8
  symmetric per output channel (8da8w, and 8da4w's 8-bit projections such as ``8da4w-attn``'s v/MLP). Which
  grid a sliced width gets is decided by the recipe's own :func:`plan_linears` (a width the group does not
  divide: the largest smaller multiple of 32 that divides it, else 8-bit per channel), per input width;
- activations: int8 asymmetric per token (the "8da" part), as torchao's converted linear does before its matmul.

The fake quantizers are torchao's own QAT ones (:class:`IntxFakeQuantizer`, configs inferred by torchao's QAT
from the recipe's ``Int8DynamicActivationIntxWeightConfig``): rounding has a straight-through gradient, so the
LoRA factors (and the gate) train through the quantized forward. The lm_head stays unquantized (the recipe keeps
it 8-bit) and so do the embedding, norms and biases.

Scales (``qat_scales``): the recipe's int4 weights use HQQ scale-only scales (``hqq_scale_only``). torchao's QAT
has no HQQ fake quantizer and its config inferred from the recipe's ignores the algorithm, so the default,
``absmax``, trains with plain absmax-symmetric scales (``max|w| / 7.5`` per group, gradients through the max)
as torchao's own QAT of this config does; the converted model equals that forward with torchao's ``affine``
algorithm, and HQQ then exports other codes (on SmolLM2-135M's decoder weights, int4 groups of 32: 88 % of the
codes agree; RMS error to the weights 0.0191 absmax, 0.0168 HQQ, 0.0182 between the two). ``hqq`` computes the
recipe's own HQQ scales of the effective weight in every forward (no gradient through them; torchao's
straight-through fake quantization with them), so the QAT forward is the exported model's (tests/finetune/
test_qat.py checks both against torchao's converted linears). It costs an HQQ solve per int4 linear per shape
forward: on one CPU thread ≈ 15-35 ms for SmolLM2's 576×576…1536×576 weights, ≈ 13× a 256-token matmul.
8-bit grids use absmax per-channel scales either way, as the recipe does.

Extraction is unchanged: it merges the fp32 LoRA into the fp32 weights (nothing here is saved), and the export
recipe then quantizes them. Training runs without depth maps, so a shape whose extraction folds a depth map into
a ``down_proj`` has that weight quantized after the fold, which training did not see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticLM
from ..errors import ConfigError
from .config import qat_problems

Grid = tuple[str, int | None]  # (recipe linear scheme "8da4w"/"8da8w", int4 group or None = per channel)


def qat_recipe(scheme: str, scales: str = "absmax"):
    """The ExecuTorch recipe whose decoder linears ``scheme`` fake-quantizes (bad settings: a ConfigError)."""
    problems = qat_problems(scheme, scales)
    if problems:
        raise ConfigError("invalid quantization-aware training settings", problems, fix="correct the listed fields")
    from ..backends.executorch.recipes import get_recipe

    return get_recipe(scheme)


def _hqq_fake_quantize(weight: torch.Tensor, group: int) -> torch.Tensor:
    """int4 symmetric groups of ``group`` with the recipe's HQQ scale-only scales (solved without gradient), through
    torchao's straight-through fake quantization: the dequantized weight the converted linear will hold."""
    from torchao.quantization.qat.utils import _fake_quantize_per_channel_group
    from torchao.quantization.quant_primitives import (
        _DTYPE_TO_QVALUE_BOUNDS,
        _choose_qparams_and_quantize_scale_only_hqq,
    )

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[torch.int4]
    with torch.no_grad():
        _, scale = _choose_qparams_and_quantize_scale_only_hqq(weight.detach(), [1, group], qmin, qmax)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return _fake_quantize_per_channel_group(weight, scale, zero, qmin, qmax, group)


def _fake_quantizers(grid: Grid):
    """torchao's (activation, weight) fake quantizers for the recipe's converted linear of ``grid``."""
    from torchao.quantization.qat import IntxFakeQuantizer
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    from ..backends.executorch.recipes import _config

    # torchao's QAT mapping of the recipe's own Int8DynamicActivationIntxWeightConfig (what QATConfig(base_config)
    # inserts): int8 asymmetric per token for the input, the weight's dtype/granularity symmetric.
    act, weight = _infer_fake_quantize_configs(_config(*grid))
    return IntxFakeQuantizer(act), IntxFakeQuantizer(weight)


class LinearFakeQuant(nn.Module):
    """The QAT hook of one :class:`ElasticLinear` (its ``fake_quant``): ``F.linear`` on the fake-quantized input
    and weight, with the grid the recipe gives this projection at the weight's input width.

    ``layout(in_features)``: the column order export writes this weight in (o_proj: transformers' group-major
    heads, the elastic model keeps them slot-major); groups along the input are formed in that order."""

    def __init__(self, recipe, name: str, layout: Callable[[int], torch.Tensor] | None = None, *,
                 scales: str = "absmax") -> None:
        super().__init__()
        self.recipe, self.name, self.layout, self.scales = recipe, name, layout, scales
        self._grids: dict[int, Grid | None] = {}
        self._quantizers: dict[Grid, tuple[nn.Module, nn.Module]] = {}
        self._orders: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}, name={self.name}, scales={self.scales}"

    def grid(self, in_features: int) -> Grid | None:
        """The recipe's (scheme, group) for this projection at ``in_features`` (None: left unquantized)."""
        if in_features not in self._grids:
            from ..backends.executorch.recipes import plan_linears

            # plan_linears decides per nn.Linear by name and width; a meta-device stand-in costs nothing.
            holder = nn.Module()
            holder.add_module(self.name, nn.Linear(in_features, 1, bias=False, device="meta"))
            plan, _ = plan_linears(holder, self.recipe)
            self._grids[in_features] = plan.get(self.name)
        return self._grids[in_features]

    def quantizers(self, grid: Grid) -> tuple[nn.Module, nn.Module]:
        if grid not in self._quantizers:
            self._quantizers[grid] = _fake_quantizers(grid)
        return self._quantizers[grid]

    def fake_quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[out, in]`` as the converted linear will hold it (dequantized)."""
        grid = self.grid(weight.shape[1])
        if grid is None:
            return weight
        scheme, group = grid
        if self.scales == "hqq" and scheme == "8da4w":
            def fq(w: torch.Tensor) -> torch.Tensor:
                return _hqq_fake_quantize(w, group)
        else:
            fq = self.quantizers(grid)[1]
        if self.layout is None:
            return fq(weight)
        key = (weight.shape[1], weight.device)
        if key not in self._orders:
            order = self.layout(weight.shape[1]).to(weight.device)
            self._orders[key] = (order, torch.argsort(order))
        order, back = self._orders[key]
        return fq(weight[:, order])[:, back]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        grid = self.grid(weight.shape[1])
        if grid is None:
            return F.linear(x, weight, bias)
        act = self.quantizers(grid)[0]
        return F.linear(act(x), self.fake_quantize_weight(weight), bias)


def o_proj_layout(elastic: ElasticLM) -> Callable[[int], torch.Tensor]:
    """o_proj input columns in the order extraction writes them, for an input width of ``n`` channels.
    With GQA every shape keeps all KV heads (the unit is a slot), with MHA the KV heads are the query heads."""
    dims = elastic.dims

    def layout(n: int) -> torch.Tensor:
        q = n // dims.head_dim
        kv = dims.num_kv_heads if dims.group_size > 1 else q
        return elastic._head_channels(elastic.group_major_heads(q, kv))
    return layout


def attach_fake_quant(elastic: ElasticLM, scheme: str, *, scales: str = "absmax") -> list[LinearFakeQuant]:
    """Make every decoder projection of ``elastic`` fake-quantize as recipe ``scheme`` exports it (``scales``: one
    of QAT_SCALES, how int4 group scales are chosen)."""
    recipe = qat_recipe(scheme, scales)
    hooks = []
    for block in elastic.layers:
        for name, lin in block.projections().items():
            if lin.fake_quant is not None:
                raise RuntimeError("this elastic model is already quantization-aware")
            hook = LinearFakeQuant(recipe, name, o_proj_layout(elastic) if name == "o_proj" else None,
                                   scales=scales)
            lin.fake_quant = hook
            hooks.append(hook)
    return hooks


@contextmanager
def base_model(elastic: ElasticLM) -> Iterator[None]:
    """Forwards of the frozen base model inside the block — no fake quantization, no adapter (the teacher of
    ``qat_teacher="base"``); hooks and adapters come back afterwards, also on error."""
    linears = [lin for block in elastic.layers for lin in block.projections().values()]
    saved = [(lin.fake_quant, lin.adapter) for lin in linears]
    try:
        for lin in linears:
            lin.fake_quant = lin.adapter = None
        yield
    finally:
        for lin, (hook, adapter) in zip(linears, saved):
            lin.fake_quant, lin.adapter = hook, adapter


def detach_fake_quant(elastic: ElasticLM) -> None:
    for block in elastic.layers:
        for lin in block.projections().values():
            lin.fake_quant = None
