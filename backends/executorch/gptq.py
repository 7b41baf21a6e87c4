"""GPTQ rounding for the ExecuTorch recipes: torchao chooses each group's grid, GPTQ chooses the rounding.

torchao's ``Int8DynamicActivationIntxWeightConfig`` rounds every weight to the nearest point of its group's
grid (HQQ-fitted scales for int4 groups, absmax for 8-bit channels). That ignores what the inputs look like: a
column fed by an outlier channel costs as much error as any other. GPTQ (Frantar et al., 2022) rounds the input
columns one at a time and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse of the input Hessian ``H = XᵀX`` gathered on calibration rows, so the layer's *output* error is what is
minimised. torchao 0.18 ships GPTQ only for its CUDA int4/int8 weight-only and NVFP4 tensors, so the solve is
here, and it writes into torchao's own tensor: the scales and zero points torchao chose stay (GPTQ's
"static groups": every column's grid is fixed before rounding starts, which is what lets act-order — rounding
the columns with the largest inputs first — keep one grid per group), only ``qdata`` changes, so export,
lowering and the runtime see exactly what they see today.

The pass is sequential, as in the reference implementation: decoder layer by decoder layer, each layer's
Hessians are gathered on the outputs of the layers already quantized (so later layers correct for earlier
layers' error), and within a layer stage by stage — the linears that read one input (q/k/v, then o, then
gate/up, then down; found by running the layer, not by name, so any Llama-family layout works) are solved
before the next stage's inputs are gathered. Memory is one layer's Hessians and the calibration rows' hidden
states, so the same pass fits a 7B model.

What was measured on SmolLM2-135M (torchao eager, 1,024 held-out tokens, all-int4 ``8da4w``, ppl ratio vs fp32;
round-to-nearest 1.341; damping 0.01 unless stated): act-order is what makes GPTQ work here — without it the
codes are *worse* than round-to-nearest (1.460 on torchao's HQQ grid, 1.428 with HQQ scales re-fitted per
updated group, the reference's own order) — plausibly because the error fed forward lands on the few massive input
channels small LLMs have; rounding those columns first gives 1.241 (1.221 at the default damping 0.1). More
calibration text does not help (16,384 tokens: 1.245 vs 1.241 at 4,096). Rerun: bench/executorch_recipe_sweep.py
(its GPTQ rows). The lm_head (8-bit in every recipe) keeps torchao's rounding: its 8-bit error is small and its
49,152-row solve would cost more than the rest together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from amoeba_export.errors import BackendError


@dataclass(frozen=True)
class GPTQSettings:
    """How the solve runs. ``damping``: fraction of the Hessian's mean diagonal added to it (the reference's
    ``percdamp``); ``act_order``: round the columns with the largest mean squared input first; ``block``:
    columns per lazy batch update (only speed depends on it)."""

    # 0.1, not the reference's 0.01: SmolLM2's few massive input channels dominate the mean diagonal, yet more
    # damping still helped (torchao eager, 1,024 held-out tokens, ppl ratio of 8da4w / 8da4w-attn: 0.01 →
    # 1.241 / 1.053, 0.1 → 1.221 / 1.037, 0.3 → 1.194 / 1.042, 1.0 → 1.230 / -); 0.1 is best for the phone recipe.
    damping: float = 0.1
    act_order: bool = True
    block: int = 128
    # "static": torchao's grid from the original weights (what act-order needs); "updated": each int4 group's
    # scales are re-fitted (torchao's HQQ) on the group's error-updated weights when its first column is reached,
    # as the reference GPTQ does without act-order, so corrections never push a group off its grid's range.
    groups: str = "static"

    def __post_init__(self) -> None:
        if self.groups not in ("static", "updated"):
            raise BackendError(f"GPTQ groups must be static or updated, got {self.groups!r}",
                               fix="supported are: static, updated")
        if self.groups == "updated" and self.act_order:
            raise BackendError("GPTQ with updated groups rounds columns in their own order (no act-order)",
                               fix="pass act_order=False with groups='updated'")

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by the capture hook: the model's forward stops once layer 0's inputs are known."""


def gptq_qdata(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group: int, qmin: int, qmax: int, settings: GPTQSettings = GPTQSettings()
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]`` (int8) and scales for ``weight`` ``[out, in]`` on the grid ``scale``/``zero``
    (``[out, in // group]``, torchao's affine convention ``w ≈ (q - zero) * scale``), rounded by GPTQ with the
    input Hessian ``hessian`` ``[in, in]``. Static groups return ``scale`` unchanged; with a diagonal Hessian no
    error is fed forward and the codes are round-to-nearest on the same grid (tests check: torchao's own)."""
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    n = w.shape[1]
    if h.shape != (n, n) or n % group or scale.shape != (w.shape[0], n // group):
        raise BackendError(f"GPTQ shapes disagree: weight {tuple(w.shape)}, Hessian {tuple(h.shape)}, "
                           f"scale {tuple(scale.shape)}, group {group}", fix="report this model's config")
    column_group = torch.arange(n) // group
    dead = torch.diag(h) == 0  # an input channel that never fired: its weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if settings.act_order:
        order = torch.argsort(torch.diag(h), descending=True)
        w, h, column_group = w[:, order], h[order][:, order], column_group[order]
    h += settings.damping * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    try:
        # The upper Cholesky factor of H⁻¹: row i holds how column i's error spreads over the columns after it.
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) for a non-positive-definite H
        raise BackendError(f"GPTQ's Hessian is not positive definite ({exc})",
                           fix="calibrate on more tokens, or export with the recipe's round-to-nearest twin") from exc
    s = scale.detach().to(torch.float64)[:, column_group]  # [out, in] in the solve's column order
    z = zero.detach().to(torch.float64)[:, column_group]
    # Codes are picked as torchao picks them (float32 product with the scale's reciprocal): a value on a tie
    # rounds the same way, so with nothing fed forward the codes are torchao's bit for bit.
    inv = (1.0 / scale.detach().float())[:, column_group]
    regrid = settings.groups == "updated" and settings.block % group == 0 and qmax - qmin == 15
    new_scale = scale.detach().clone()
    q = torch.zeros_like(w)
    for start in range(0, n, settings.block):
        stop = min(start + settings.block, n)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        for i in range(stop - start):
            col = start + i
            if regrid and col % group == 0:  # a group lies inside one block: its columns are all in `block`
                fitted = _hqq_scale(block[:, i:i + group].float(), qmin, qmax)
                new_scale[:, col // group] = fitted.to(new_scale.dtype)
                s[:, col:col + group] = fitted.double()[:, None]
                inv[:, col:col + group] = (1.0 / fitted.to(new_scale.dtype).float())[:, None]
            codes = torch.clamp(torch.round(block[:, i].float() * inv[:, col]).double() + z[:, col], qmin, qmax)
            q[:, col] = codes
            err = (block[:, i] - (codes - z[:, col]) * s[:, col]) / u[col, col]
            block[:, i:] -= err[:, None] * u[col, col:stop][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    if settings.act_order:
        q = q[:, torch.argsort(order)]
    return q.to(torch.int8), new_scale


def _hqq_scale(group_weights: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """torchao's HQQ scale-only fit (what the recipes' int4 config runs) for one group ``[out, group]``."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    _, fitted = _choose_qparams_and_quantize_scale_only_hqq(group_weights.contiguous(),
                                                           [1, group_weights.shape[1]], qmin, qmax)
    return fitted.reshape(-1)


def _grid(weight) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """scale, zero point, group, qmin, qmax of a torchao ``IntxUnpackedToInt8Tensor`` weight."""
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

    block = tuple(weight.block_size)
    if len(block) != 2 or block[0] != 1:
        raise BackendError(f"GPTQ needs row-wise groups, got block size {block}", fix="report this recipe")
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[weight.target_dtype]
    return weight.scale, weight.zero_point, int(block[1]), int(qmin), int(qmax)


def is_quantized(linear: nn.Module) -> bool:
    """Whether ``linear``'s weight is a torchao intx tensor GPTQ can round (what the ExecuTorch recipes make)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return isinstance(linear, nn.Linear) and isinstance(linear.weight, IntxUnpackedToInt8Tensor)


def _layer_inputs(model: nn.Module, rows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each row, and the keyword arguments the model passes every
    layer (rotary cos/sin, mask, positions): rows have one length, so one set serves all rows and layers."""
    layers = model.model.layers
    hidden: list[torch.Tensor] = []
    captured: dict = {}

    def capture(module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for row in rows:
            try:
                model(input_ids=row[None].long(), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, captured


def _run(layer: nn.Module, hidden: Iterable[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outs = []
    for x in hidden:
        out = layer(x, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _stages(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> list[list[nn.Linear]]:
    """The layer's quantized linears in call order, grouped by the input they read (q/k/v share one)."""
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0])))
               for m in layer.modules() if is_quantized(m)]
    try:
        _run(layer, [x], kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[nn.Linear]] = []
    last = None
    for mod, inp in calls:
        if stages and inp is last:
            stages[-1].append(mod)
        elif all(mod not in stage for stage in stages):
            stages.append([mod])
        last = inp
    return stages


def _hessian(layer: nn.Module, reader: nn.Linear, hidden: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
    """``XᵀX / tokens`` of ``reader``'s input over the calibration rows, in float64."""
    total = torch.zeros(reader.in_features, reader.in_features, dtype=torch.float64)
    count = 0

    def hook(mod, args):
        nonlocal total, count
        x = args[0].detach().reshape(-1, reader.in_features).to(torch.float64)
        total += x.T @ x
        count += x.shape[0]

    handle = reader.register_forward_pre_hook(hook)
    try:
        _run(layer, hidden, kwargs)
    finally:
        handle.remove()
    return total / max(count, 1)


def gptq_model(model: nn.Module, full_precision: dict[nn.Linear, torch.Tensor], rows: torch.Tensor,
               settings: GPTQSettings = GPTQSettings(), progress=None) -> dict:
    """Re-round every torchao-quantized linear of ``model``'s decoder layers with GPTQ, layer by layer.

    ``model`` is the HF causal LM whose linears the recipe has quantized; ``full_precision`` maps each of those
    linears to its weight before quantization (entries are removed as they are solved); ``rows`` ``[n, seq_len]``
    are calibration token rows. Returns what the artifact's meta records (linears solved; seconds are the
    caller's)."""
    layers = model.model.layers
    solved = 0
    with torch.no_grad():
        hidden, kwargs = _layer_inputs(model, rows)
        for layer in layers:
            for stage in _stages(layer, hidden[0], kwargs):
                h = _hessian(layer, stage[0], hidden, kwargs)
                for linear in stage:
                    weight = linear.weight
                    scale, zero, group, qmin, qmax = _grid(weight)
                    # popped: each fp32 weight is released once solved, so only unsolved layers stay in fp32
                    codes, fitted = gptq_qdata(full_precision.pop(linear), h, scale, zero, group, qmin, qmax,
                                               settings)
                    weight.qdata.copy_(codes)
                    weight.scale.copy_(fitted)
                    solved += 1
            hidden = _run(layer, hidden, kwargs)
            if progress is not None:
                progress()
    return {"method": "gptq", "linears": solved, **settings.to_dict()}
