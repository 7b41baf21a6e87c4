"""Accuracy of an ExecuTorch quantization recipe in torchao eager, without lowering (benchmarks' shared measure).

The recipe is applied with ``apply_recipe`` to the exportable static-cache module (``StaticCacheLM``, every
position's logits) of an HF folder and compared with the same module in fp32 on token rows: top-1 agreement,
mean KL(fp32 ‖ quantized) and perplexity ratio — the validator's metrics. The lowered ``.pte`` matches torchao
eager within the tolerances tests/backends/test_executorch.py checks, so this ranks recipes and checkpoints
without ≈ 10 min of XNNPACK lowering each. bench/executorch_recipe_sweep.py (recipes on one folder) and
bench/qat_gain.py (one recipe on fine-tuned subnets) measure with it.

    rows = measurement_rows("heldout", load_tokenizer(folder), 256, 1024).rows
    ref = reference(load_model(folder), rows)             # fp32 logits, computed once per folder
    measure(folder, "8da4w", rows, ref=ref)               # {"top1", "kl", "ppl_ratio", "ppl", "fp32_ppl"}
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def static_logits(module: nn.Module, rows: torch.Tensor, *, progress: bool = False, desc: str = "logits"
                  ) -> torch.Tensor:
    """``[n, t, vocab]`` fp32 logits of a full-logits ``StaticCacheLM`` over ``rows`` ``[n, t]``, one prefill per
    row from position 0 (the cache is overwritten from the start, so rows do not see each other)."""
    it = tqdm(rows, desc=desc, unit="row", leave=False, disable=not progress)
    return torch.stack([module(r[None], torch.tensor([0]))[0].float() for r in it])


def rows_perplexity(logits: torch.Tensor, rows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of ``[n, t, vocab]`` logits (or log-probabilities) for ``rows``."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, rows[:, 1:].reshape(-1)).exp().item()


def static_module(model: nn.Module, rows: torch.Tensor) -> nn.Module:
    """The exportable static-cache module of ``model``, holding a whole row, returning every position's logits."""
    from amoeba_export.backends.executorch.module import StaticCacheLM

    return StaticCacheLM(model, rows.shape[1], full_logits=True).eval()


@dataclass(frozen=True)
class Reference:
    """The fp32 static-cache module's logits over ``rows``: what every recipe of the same folder is compared to."""

    rows: torch.Tensor
    logits: torch.Tensor

    @cached_property
    def logp(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, -1)

    @cached_property
    def ppl(self) -> float:
        return rows_perplexity(self.logits, self.rows)


def reference(model: nn.Module, rows: torch.Tensor, *, progress: bool = False) -> Reference:
    """fp32 logits of ``model`` (an HF causal LM, not modified) as the exportable module computes them."""
    return Reference(rows, static_logits(static_module(model, rows), rows, progress=progress, desc="fp32"))


def compare(ref: Reference, q_logits: torch.Tensor) -> dict[str, float]:
    """top-1 agreement, mean KL(fp32 ‖ quantized), perplexity ratio and both perplexities."""
    q_logp = torch.log_softmax(q_logits, -1)
    ppl = rows_perplexity(q_logp, ref.rows)
    return {"top1": (ref.logits.argmax(-1) == q_logp.argmax(-1)).float().mean().item(),
            "kl": (ref.logp.exp() * (ref.logp - q_logp)).sum(-1).mean().item(),
            "ppl_ratio": ppl / ref.ppl, "ppl": ppl, "fp32_ppl": ref.ppl}


def measure(folder: str | Path, recipe, rows: torch.Tensor, *, ref: Reference | None = None, gptq=None,
            progress: bool = False) -> dict[str, float]:
    """Quantize a fresh load of the HF ``folder`` with ``recipe`` (a name or a ``Recipe``) in torchao eager and
    compare it with its fp32 self on ``rows`` (``ref``: that comparison's fp32 side, computed here when None).

    A ``gptq`` recipe rounds on ``recipe.calibration_tokens`` tokens of the calibration split in rows of the
    validator's length (never the held-out rows), with ``gptq`` (``GPTQSettings``; None: the defaults).
    Returns :func:`compare`'s dict."""
    from amoeba_export.backends.executorch.recipes import apply_recipe, calibration_for, get_recipe
    from amoeba_export.modelio import load_model

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if ref is None:
        ref = reference(load_model(folder), rows, progress=progress)
    fresh = load_model(folder)
    module = static_module(fresh, rows)
    with torch.no_grad():
        apply_recipe(module, recipe, calibration=calibration_for(folder, fresh, recipe, gptq))
    return compare(ref, static_logits(module, rows, progress=progress, desc=recipe.name))
