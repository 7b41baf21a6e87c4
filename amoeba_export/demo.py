"""The main job on the shipped default model: plan → pick shapes by budget → extract → measure.

Every stage's artifact lives in the cache (``$AMOEBA_CACHE/demo``); a second run reuses the plan.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import read_meta
from .data import measurement_rows
from .errors import CheckpointError
from .evaluation.perplexity import hf_logits_fn, perplexity
from .modelio import load_model, load_tokenizer, resolve_model
from .paths import cache_subdir

TARGETS = (0.75, 0.50, 0.35)  # fractions of the full model's parameters


@dataclass
class Row:
    name: str
    params: int
    ppl: float
    seconds: float
    extract_seconds: float | None
    ppl_text: str = ""  # the rows ``ppl`` was measured on (MeasurementRows.label)


def ensure_plan(model_dir: Path, plan_dir: Path):
    """The cached plan for ``model_dir``; computed when missing or made for another model."""
    from .plan import Plan, PlanConfig, build_plan

    try:
        plan = Plan.load(plan_dir)
        if Path(plan.model_dir) == Path(model_dir) and plan.config == PlanConfig():
            print(f"plan: reusing {plan_dir} ({plan.stats['dp_evaluations']} DP evaluations, "
                  f"{plan.stats['total_seconds']:.0f} s when computed)")
            return plan
    except CheckpointError:
        pass
    started = time.perf_counter()
    plan = build_plan(model_dir)
    plan.save(plan_dir, force=True)
    print(f"plan: {plan.stats['dp_evaluations']} DP evaluations, computed in {time.perf_counter() - started:.0f} s")
    return Plan.load(plan_dir)


def forward_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(input_ids=ids[:, :32], use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_demo(model: str | None = None, *, eval_tokens: int = 2048, speed_tokens: int = 512,
             targets: tuple[float, ...] = TARGETS) -> list[Row]:
    from .extract import pick_for_params, write_subnet
    from .plan import load_elastic

    model_dir = resolve_model(model)
    work = cache_subdir("demo")
    plan = ensure_plan(model_dir, work / "plan")
    tok = load_tokenizer(model_dir)
    measured = measurement_rows("heldout", tok, 512, eval_tokens)
    heldout = measured.rows
    elastic, _ = load_elastic(work / "plan")
    full_params = plan.params_for(plan.full_shape(), compensate=False)

    folders: list[tuple[Path, float | None]] = [(model_dir, None)]
    for frac in targets:
        budget = int(full_params * frac)
        shape = pick_for_params(elastic, plan, budget)
        out = work / "subnets" / f"params{int(frac * 100)}"
        t = time.perf_counter()
        write_subnet(elastic, shape, out, source_dir=model_dir, force=True,
                     meta={"source": str(work / "plan"), "target_fraction": frac})
        folders.append((out, time.perf_counter() - t))
        print(f"{int(frac * 100)}% budget: chose {shape.name} ({shape.describe()}); "
              f"extracted in {folders[-1][1]:.2f} s")

    rows = []
    for folder, extract_s in folders:
        m = load_model(folder)
        with torch.no_grad():
            ppl = perplexity(hf_logits_fn(m), heldout)
        secs = forward_seconds(m, heldout[:1, :speed_tokens])
        name = read_meta(folder).get("shape", {}).get("name", "full") if extract_s is not None else "full"
        rows.append(Row(name, sum(p.numel() for p in m.parameters()), ppl, secs, extract_s, measured.label()))
        del m
    return rows


def format_table(rows: list[Row]) -> str:
    full = rows[0]
    lines = [f"{'shape':<26} {'params':>12} {'% full':>7} {'held-out ppl':>13} {'fwd speed-up':>13} {'extract s':>10}"]
    for r in rows:
        ext = "-" if r.extract_seconds is None else f"{r.extract_seconds:.2f}"
        lines.append(f"{r.name:<26} {r.params:>12,} {100 * r.params / full.params:>6.1f}% {r.ppl:>13.2f} "
                     f"{full.seconds / r.seconds:>12.2f}× {ext:>10}")
    if full.ppl_text:
        lines.append(f"held-out ppl: perplexity over {full.ppl_text}")
    return "\n".join(lines)
