"""Quantization recipes for the ExecuTorch backend: torchao ``quantize_`` on the exportable module, before export.

A recipe names a scheme for the decoder linears (with per-projection 8-bit overrides), one for the lm_head and
one for the embedding table. Measured on SmolLM2-135M (bench/executorch_speed.py; torchao eager gives the same
figures within 0.01): int4 decoder linears lose too much on a model this small whatever the lm_head gets —
``8da4w`` (HQQ int4 groups of 32, 8-bit lm_head and embedding) has top-1 agreement 0.65 and perplexity ratio
1.24, and fails its gate like ExecuTorch's plain recipe (``8da4w-head4``). The MLP's gate/up projections are
the sensitive ones, so ``8da4w-attn`` keeps int4 for the q/k/o projections only (ppl ratio 1.09) and passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from amoeba_export.errors import BackendError

from .gptq import GPTQSettings

RECIPE_VERSION = 2  # 2: ``rounding`` and ``calibration_tokens`` (GPTQ); version-1 recipes were all round-to-nearest
CALIBRATION_SEQ_LEN = 512  # the validator's row length
GROUP_MULTIPLE = 32  # XNNPACK delegates int4 groups only in multiples of 32
ROUNDINGS = ("rtn", "gptq")


@dataclass(frozen=True)
class Recipe:
    name: str
    linear: str | None  # decoder linears: None (fp32), "8da4w", "8da8w", "int8wo"
    head: str | None  # lm_head, same vocabulary
    embedding: str | None  # None (fp32) or "int8" (per-row symmetric)
    group_size: int = 32  # int4 group along the input dimension
    description: str = ""
    broken: str = ""  # non-empty: refused with this reason (a stack bug measured here)
    keep_8bit: tuple[str, ...] = ()  # decoder linears (module-name suffixes) in 8da8w under an 8da4w recipe
    # "rtn": torchao's rounding; "gptq": the same grids, codes re-rounded by GPTQ (gptq.py) on calibration rows
    rounding: str = "rtn"
    calibration_tokens: int = 0  # gptq: tokens of the calibration split (rows of CALIBRATION_SEQ_LEN)
    version: int = RECIPE_VERSION

    def scheme_for(self, module: str) -> str | None:
        """The scheme of the linear called ``module`` (``lm_head`` or a decoder projection), before group fallback."""
        if module == "lm_head":
            return self.head
        if self.linear == "8da4w" and self.keep_8bit and module.endswith(self.keep_8bit):
            return "8da8w"
        return self.linear


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32", None, None, None, description="no quantization"),
    Recipe("8da4w", "8da4w", "8da8w", "int8", 32,
           "int8 dynamic activations, int4 weights in groups of 32 (HQQ scales); lm_head and embedding int8"),
    Recipe("8da4w-attn", "8da4w", "8da8w", "int8", 32,
           "int4 (groups of 32, HQQ) for the attention q/k/o projections; v, MLP, lm_head and embedding int8",
           keep_8bit=("v_proj", "gate_proj", "up_proj", "down_proj")),
    Recipe("8da4w-gptq", "8da4w", "8da8w", "int8", 32,
           "as 8da4w (same HQQ grids), every decoder linear's codes rounded by GPTQ on 4,096 calibration tokens",
           rounding="gptq", calibration_tokens=4096),
    Recipe("8da4w-attn-gptq", "8da4w", "8da8w", "int8", 32,
           "as 8da4w-attn, every decoder linear's codes rounded by GPTQ on 4,096 calibration tokens",
           keep_8bit=("v_proj", "gate_proj", "up_proj", "down_proj"), rounding="gptq", calibration_tokens=4096),
    Recipe("8da4w-g128", "8da4w", "8da8w", "int8", 128,
           "as 8da4w with groups of 128 (widths that 128 does not divide fall back to a smaller group)"),
    Recipe("8da4w-head4", "8da4w", "8da4w", None, 32,
           "ExecuTorch's plain recipe: lm_head int4 too, embedding fp32 (expected to fail its gate)"),
    Recipe("8da8w", "8da8w", "8da8w", "int8", description="int8 dynamic activations, int8 per-channel weights"),
    Recipe("int8wo", "int8wo", "int8wo", "int8", description="int8 weight-only",
           broken="XNNPACK's lowering of torchao int8 weight-only linears gives wrong logits with executorch "
                  "1.4.1 (max |Δlogit| ≈ 1.5e3 vs torchao eager on a tiny Llama)"),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; unknown and disabled recipes are errors naming the alternatives."""
    recipe = RECIPES.get(name.lower())
    if recipe is None:
        raise BackendError(f"unknown ExecuTorch quantization recipe {name!r}; supported are: "
                           f"{', '.join(r for r in RECIPES if not RECIPES[r].broken)}",
                           fix="pick one of the supported recipes")
    if recipe.broken:
        raise BackendError(f"recipe {recipe.name!r} is disabled: {recipe.broken}",
                           fix="use 8da8w (the same int8 weights with int8 dynamic activations)")
    return recipe


def rtn_twin(recipe: Recipe) -> Recipe:
    """The shipped recipe with ``recipe``'s grids and torchao's rounding (``recipe`` itself when it is one)."""
    if recipe.rounding == "rtn":
        return recipe
    same = [r for r in RECIPES.values() if r.rounding == "rtn" and not r.broken and
            (r.linear, r.head, r.embedding, r.group_size, r.keep_8bit) ==
            (recipe.linear, recipe.head, recipe.embedding, recipe.group_size, recipe.keep_8bit)]
    return same[0] if same else recipe


def _fallback_group(in_features: int, group: int) -> int | None:
    """The largest multiple of 32 below ``group`` that divides ``in_features`` (None if there is none)."""
    for g in range(group - GROUP_MULTIPLE, GROUP_MULTIPLE - 1, -GROUP_MULTIPLE):
        if in_features % g == 0:
            return g
    return None


def _config(scheme: str, group: int | None):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if scheme == "8da4w":
        # HQQ-refined scales, as ExecuTorch's own LLM export does: clearly better top-1 than plain affine.
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group),
                                                     intx_choose_qparams_algorithm="hqq_scale_only")
    raise BackendError(f"unknown linear scheme {scheme!r}", fix="use 8da4w or 8da8w")


def plan_linears(model: nn.Module, recipe: Recipe, *, group_fallback: bool = True
                 ) -> tuple[dict[str, tuple[str, int | None]], list[str]]:
    """``fqn -> (scheme, group)`` for every linear the recipe quantizes, plus notes on each fallback.

    A width the group size does not divide is never skipped silently: with ``group_fallback`` it gets the
    largest smaller group that divides it (or 8-bit per channel), and a note says so; without, an error.
    """
    plan: dict[str, tuple[str, int | None]] = {}
    fallbacks: dict[str, list[str]] = {}
    bad: list[str] = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        scheme = recipe.scheme_for(fqn)
        if scheme is None:
            continue
        group = recipe.group_size if scheme == "8da4w" else None
        if group is not None and mod.in_features % group:
            if not group_fallback:
                bad.append(f"{fqn} (in_features {mod.in_features})")
                continue
            smaller = _fallback_group(mod.in_features, group)
            scheme, group = (scheme, smaller) if smaller else ("8da8w", None)
            what = f"8da4w group {smaller}" if smaller else "8da8w per channel"
            fallbacks.setdefault(f"in_features {mod.in_features} → {what}", []).append(fqn)
        plan[fqn] = (scheme, group)
    if bad:
        raise BackendError(f"group size {recipe.group_size} does not divide the input width of {len(bad)} "
                           f"linear(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}",
                           fix="pick a group size that divides every width, or allow group_fallback")
    notes = [f"group size {recipe.group_size} does not divide {len(names)} linear(s), {why}: "
             f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for why, names in fallbacks.items()]
    return plan, notes


@dataclass(frozen=True)
class Calibration:
    """What a ``gptq`` recipe rounds with: the HF model whose linears the module shares, and token rows."""

    model: nn.Module
    rows: torch.Tensor  # [n, CALIBRATION_SEQ_LEN]
    label: str  # what the rows were read from, as meta quotes it
    settings: GPTQSettings = GPTQSettings()


def calibration_for(hf_dir, model: nn.Module, recipe: Recipe, settings: GPTQSettings | None = None
                    ) -> Calibration | None:
    """What a GPTQ recipe rounds with: ``recipe.calibration_tokens`` of the calibration split in rows spread over
    it (never held-out text), for ``model`` loaded from ``hf_dir``; None for a round-to-nearest recipe."""
    if recipe.rounding != "gptq":
        return None
    from amoeba_export.data import measurement_rows
    from amoeba_export.modelio import load_tokenizer

    rows = measurement_rows("calibration", load_tokenizer(hf_dir), CALIBRATION_SEQ_LEN, recipe.calibration_tokens)
    return Calibration(model, rows.rows, rows.label(), settings or GPTQSettings())


def apply_recipe(module: nn.Module, recipe: Recipe, *, group_fallback: bool = True,
                 calibration: Calibration | None = None) -> tuple[list[str], dict | None]:
    """Quantize ``module`` (a StaticCacheLM) in place; returns notes for meta.json and, for a ``gptq`` recipe,
    the calibration summary (``calibration`` is then required)."""
    from torchao.quantization import quantize_

    if recipe.rounding == "gptq" and calibration is None:
        raise BackendError(f"recipe {recipe.name!r} rounds with GPTQ and needs calibration rows",
                           fix="export through the ExecuTorch backend, which reads the calibration split")

    from .module import Int8Embedding

    if recipe.head is not None and module.lm_head.weight is module.embed_tokens.weight:
        # quantize_ swaps the lm_head weight for a quantized tensor; untie so the embedding keeps its table.
        head = nn.Linear(module.lm_head.in_features, module.lm_head.out_features,
                         bias=module.lm_head.bias is not None)
        head.weight = nn.Parameter(module.lm_head.weight.detach().clone(), requires_grad=False)
        if module.lm_head.bias is not None:
            head.bias = module.lm_head.bias
        module.lm_head = head
    plan, notes = plan_linears(module, recipe, group_fallback=group_fallback)
    # GPTQ solves from the weights torchao is about to replace (the same Linear objects keep the new tensors).
    full = ({m: m.weight.detach() for fqn, m in module.named_modules() if fqn in plan and fqn != "lm_head"}
            if recipe.rounding == "gptq" else {})
    for key in sorted(set(plan.values()), key=str):
        quantize_(module, _config(*key), filter_fn=lambda m, fqn, key=key: plan.get(fqn) == key)
    summary = None
    if recipe.rounding == "gptq":
        from .gptq import gptq_model

        started = time.perf_counter()
        summary = gptq_model(calibration.model, full, calibration.rows, calibration.settings)
        summary.update(text=calibration.label, seconds=round(time.perf_counter() - started, 1))
        notes.append(f"GPTQ rounding of {summary['linears']} decoder linears on {calibration.label}")
    if recipe.embedding == "int8":
        module.embed_tokens = Int8Embedding(module.embed_tokens.weight)
    return notes, summary
