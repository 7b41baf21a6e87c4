"""``amoeba search``: the most accurate shape of an elastic model that meets every budget of a device target.

Accuracy is measured (held-out perplexity of the elastic model at each candidate shape, cached per shape);
efficiency is predicted: file size and memory from the shape's tensors priced under the target's quant
scheme, decode speed from a calibration bench of the target backend on this machine (calibrate.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import write_json
from ..errors import BudgetError
from ..identity import stage_identity
from ..paths import cache_subdir
from ..shape import Shape
from ..targets import TargetProfile
from .calibrate import Calibration, calibrate, probe_shapes
from .sizing import kv_cache_bytes, weight_bytes

SEARCH_VERSION = 2  # 2: held-out rows spread over the split (1 read its first tokens: a Gutenberg header)
MB = 1e6
BUDGET_UNITS = {"max_file_mb": "MB", "max_memory_mb": "MB", "min_decode_tok_s": "tok/s"}


@dataclass(frozen=True)
class Candidate:
    shape: dict[str, Any]
    name: str
    depth: int
    params: int
    ppl: float
    weight_bytes: int
    file_bytes: float
    memory_bytes: float
    decode_tok_s: float
    breaks: dict[str, list[float]] = field(default_factory=dict)  # budget -> [predicted, limit]
    frontier: bool = False

    @property
    def feasible(self) -> bool:
        return not self.breaks

    def predicted(self, budget: str) -> float:
        return {"max_file_mb": self.file_bytes / MB, "max_memory_mb": self.memory_bytes / MB,
                "min_decode_tok_s": self.decode_tok_s}[budget]


@dataclass(frozen=True)
class SearchResult:
    target: dict[str, Any]
    source: str
    candidates: tuple[Candidate, ...]
    chosen: int | None
    closest: int | None
    calibration: dict[str, Any]
    eval_tokens: int
    seconds: dict[str, float]
    version: int = SEARCH_VERSION
    ppl_text: str = ""  # the rows every candidate's perplexity was measured on (MeasurementRows.label)

    @property
    def best(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        return cls(**{**d, "candidates": tuple(Candidate(**c) for c in d["candidates"])})

    def failure_message(self) -> str:
        c = self.candidates[self.closest]
        broken = "; ".join(f"{b} {c.predicted(b):.4g} {BUDGET_UNITS[b]} {'>' if b.startswith('max') else '<'} "
                           f"limit {lim:g}" for b, (pred, lim) in c.breaks.items())
        never = [b for b in self.target["budgets_set"]
                 if all(b in x.breaks for x in self.candidates)]
        lead = (f"no shape meets budget {', '.join(never)} of target {self.target['name']}"
                if never else f"no shape meets every budget of target {self.target['name']} at once")
        return f"{lead}; the closest is {c.name} ({c.params:,} params), which breaks {broken}"

    def table(self, limit: int | None = None) -> str:
        rows = sorted(self.candidates, key=lambda c: c.params, reverse=True)[:limit]
        lines = [f"{'shape':<24} {'params':>12} {'ppl':>9} {'file MB':>9} {'mem MB':>8} {'tok/s':>8}  status"]
        for c in rows:
            mark = "CHOSEN" if self.best is c else ("ok" if c.feasible else "breaks " + ",".join(c.breaks))
            lines.append(f"{c.name:<24} {c.params:>12,} {c.ppl:>9.3f} {c.file_bytes / MB:>9.2f} "
                         f"{c.memory_bytes / MB:>8.1f} {c.decode_tok_s:>8.1f}  {mark}{' *' if c.frontier else ''}")
        if self.ppl_text:
            lines.append(f"ppl: perplexity over {self.ppl_text}")
        return "\n".join(lines)


def candidate_shapes(plan, modes: tuple[str, ...], max_candidates: int) -> list[Shape]:
    """The plan's (depth × width × mode) grid, depths thinned evenly when it exceeds ``max_candidates``."""
    depths = plan.depths
    per_depth = len(plan.width_ratios) * len(modes)
    keep = max(2, max_candidates // per_depth)
    if len(depths) > keep:
        step = (len(depths) - 1) / (keep - 1)
        depths = sorted({depths[round(i * step)] for i in range(keep)}, reverse=True)
    shapes, seen = [], set()
    for d in depths:
        for w in plan.width_ratios:
            for m in modes:
                s = plan.shape(d, w, m)
                if s not in seen:  # width 1.0 is the same shape in every mode
                    seen.add(s)
                    shapes.append(s)
    return shapes


class PerplexityCache:
    """Held-out perplexity per (source, shape, tokens), persisted as one JSON file per source."""

    def __init__(self, sid: str, eval_tokens: int, seq_len: int) -> None:
        # Versioned: figures measured on rows of an older SEARCH_VERSION are never reused.
        self.path = cache_subdir("deploy", f"ppl-v{SEARCH_VERSION}") / f"{sid}.json"
        self.suffix = f"|{eval_tokens}|{seq_len}"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def key(self, shape: Shape) -> str:
        return hashlib.sha256(shape.to_json().encode()).hexdigest()[:20] + self.suffix

    def get(self, shape: Shape) -> float | None:
        return self.data.get(self.key(shape))

    def put(self, shape: Shape, ppl: float) -> None:
        self.data[self.key(shape)] = ppl
        write_json(self.path, self.data)


def measure_perplexities(elastic, plan, shapes: list[Shape], cache: PerplexityCache, *, eval_tokens: int,
                         seq_len: int, progress: bool = True) -> tuple[list[float], str]:
    """Held-out perplexity of each shape (cached), and the label of the rows they were measured on."""
    import torch
    from tqdm.auto import tqdm

    from ..data import measurement_rows
    from ..evaluation.perplexity import perplexity
    from ..extract import prepare_shape
    from ..modelio import load_tokenizer

    # Tokenizing is cached, so reading the rows when every figure is cached costs little; it gives the label.
    measured = measurement_rows("heldout", load_tokenizer(plan.model_dir), seq_len, eval_tokens)
    out = []
    for shape in tqdm(shapes, desc="held-out ppl", unit="shape", disable=not progress):
        value = cache.get(shape)
        if value is None:
            prepare_shape(elastic, shape)
            with torch.no_grad():
                value = perplexity(lambda ids, s=shape: elastic(ids, s), measured.rows)
            cache.put(shape, value)
        out.append(value)
    return out, measured.label()


def frontier_flags(params: list[int], ppls: list[float]) -> list[bool]:
    """Pareto frontier: no other shape is both smaller (or equal) and more accurate."""
    order = sorted(range(len(params)), key=lambda i: (params[i], ppls[i]))
    best, flags = float("inf"), [False] * len(params)
    for i in order:
        if ppls[i] < best:
            flags[i], best = True, ppls[i]
    return flags


def search(source: str | Path, profile: TargetProfile, *, eval_tokens: int = 1024, seq_len: int = 256,
           calibration_repeats: int = 3, progress: bool = True,
           loaded=None) -> SearchResult:
    """Evaluate the candidates of ``source`` for ``profile``; ``loaded`` = (elastic, plan) to skip loading."""
    from ..extract import load_source, prepare_shape
    from ..modelio import load_config

    t0 = time.perf_counter()
    sid = stage_identity(source)  # by content: a re-planned folder misses every cache
    elastic, plan = loaded if loaded is not None else load_source(source)[:2]
    dims, compensate = plan.dims, elastic.compensating
    model_type = load_config(plan.model_dir).model_type
    shapes = candidate_shapes(plan, profile.width_modes, profile.max_candidates)
    params = [s.num_params(dims, bias=compensate) for s in shapes]
    t_load = time.perf_counter()
    ppls, ppl_text = measure_perplexities(elastic, plan, shapes, PerplexityCache(sid, eval_tokens, seq_len),
                                eval_tokens=eval_tokens, seq_len=seq_len, progress=progress)
    t_ppl = time.perf_counter()

    def w_of(shape: Shape) -> int:
        return weight_bytes(profile.backend, profile.quant, dims, shape, model_type=model_type,
                            compensate=compensate, export_options=profile.export)

    def kv_of(shape: Shape, ctx: int) -> int:
        return kv_cache_bytes(profile.backend, shape, dims.head_dim, ctx)

    cal: Calibration = calibrate(
        elastic, plan, probe_shapes(shapes, params), source_id=sid,
        backend=profile.backend, quant=profile.quant, export_options=profile.export, threads=profile.threads,
        weight_fn=w_of, kv_fn=kv_of, prepare=lambda s: prepare_shape(elastic, s), repeats=calibration_repeats,
        progress=progress)
    t_cal = time.perf_counter()

    flags = frontier_flags(params, ppls)
    budgets = profile.budgets
    candidates = []
    for shape, n, ppl, front in zip(shapes, params, ppls, flags):
        w = w_of(shape)
        c = Candidate(shape=shape.to_dict(), name=shape.name, depth=shape.depth, params=n, ppl=ppl, weight_bytes=w,
                      file_bytes=cal.predict_size(w),
                      memory_bytes=cal.predict_memory(w, kv_of(shape, profile.context_length)),
                      decode_tok_s=cal.predict_tok_s(w, shape.depth), frontier=front)
        breaks = {}
        for name, limit in budgets.items():
            pred = c.predicted(name)
            if (name.startswith("max") and pred > limit) or (name.startswith("min") and pred < limit):
                breaks[name] = [pred, limit]
        candidates.append(Candidate(**{**asdict(c), "breaks": breaks}))
    feasible = [i for i, c in enumerate(candidates) if c.feasible]
    chosen = min(feasible, key=lambda i: (candidates[i].ppl, candidates[i].params)) if feasible else None

    def badness(c: Candidate) -> float:
        return max((p / lim if name.startswith("max") else lim / p) - 1 for name, (p, lim) in c.breaks.items())

    closest = None if feasible else min(range(len(candidates)), key=lambda i: badness(candidates[i]))
    target = {**profile.to_dict(), "budgets_set": [b for b, _ in budgets.items()]}
    return SearchResult(
        target=target, source=str(source), candidates=tuple(candidates), chosen=chosen, closest=closest,
        calibration=cal.to_dict(), eval_tokens=eval_tokens, ppl_text=ppl_text,
        seconds={"load": round(t_load - t0, 2), "perplexity": round(t_ppl - t_load, 2),
                 "calibration": round(t_cal - t_ppl, 2), "calibration_cached_run": cal.seconds,
                 "total": round(time.perf_counter() - t0, 2)})


def require_choice(result: SearchResult) -> Candidate:
    """The chosen candidate, or a BudgetError naming the closest shape and the budget it breaks."""
    if result.best is None:
        raise BudgetError(result.failure_message(),
                          fix="relax that budget (--budget NAME=VALUE or edit the profile) or plan deeper removals")
    return result.best
