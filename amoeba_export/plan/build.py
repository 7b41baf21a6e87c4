"""``amoeba plan``: compute a model's depth tables and width rankings on calibration text."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import chunks, split_tokens
from ..elastic import make_elastic
from ..modelio import load_model, load_tokenizer, resolve_model
from .depth_baselines import block_influence, block_influence_selection, drop_last_selection
from .depth_dp import DepthSearch, dp_layer_selection
from .depth_scores import SuffixChoiceError, SuffixPerplexity
from .plan import Plan, PlanConfig, max_removed_layers
from .width_importance import collect_stats, layer_covariance, rank_layer


def build_plan(model: str | Path | None, config: PlanConfig | None = None, *, progress: bool = True,
               calibration: torch.Tensor | None = None) -> Plan:
    """Compute a plan; ``calibration`` (a token stream) replaces the shipped calibration split."""
    config = (config or PlanConfig()).validate()
    model_dir = resolve_model(model)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    elastic = make_elastic(load_model(model_dir))
    n = elastic.dims.num_layers
    calib = split_tokens("calibration", tokenizer) if calibration is None else calibration
    spread = config.calibration_rows == "spread"
    width_rows = chunks(calib, config.seq_len, config.width_tokens, spread=spread)
    depth_rows = chunks(calib, config.depth_seq_len, config.depth_tokens, spread=spread)

    t0 = time.perf_counter()
    # One pass gathers the importance statistics and the input covariances least-squares reconstruction needs.
    attn, mlp = collect_stats(elastic, width_rows, gram=True, progress=progress)
    rankings = tuple(rank_layer(elastic, i, attn[i], mlp[i], order=config.width_order, ridge=config.width_ridge)
                     for i in tqdm(range(n), desc="width order", disable=not progress))
    covariances = tuple(layer_covariance(elastic, rankings[i], attn[i], mlp[i]) for i in range(n))
    del attn, mlp
    width_seconds = time.perf_counter() - t0

    max_removed = max_removed_layers(n, config.max_removed)
    candidates = list(range(n - 1)) if config.keep_last else list(range(n))
    t0 = time.perf_counter()
    scorer = (SuffixPerplexity(elastic, depth_rows) if config.depth_metric == "perplexity"
              else choice_scorer(elastic, tokenizer, config.depth_metric.removeprefix("mc:")))
    dp = dp_layer_selection(candidates, max_removed, scorer, full_score=scorer.full_loss, progress=progress)
    dp.seconds = time.perf_counter() - t0
    bi_values = block_influence(elastic, depth_rows)
    searches: dict[str, DepthSearch] = {
        "dp": dp,
        "block_influence": block_influence_selection(bi_values, max_removed),
        "drop_last": drop_last_selection(n, max_removed),
    }
    if progress:
        tqdm.write(f"depth DP: {dp.evaluations} evaluations in {dp.seconds:.1f} s; "
                   f"width statistics: {width_seconds:.1f} s")
    stats = {
        "dp_evaluations": dp.evaluations,
        "dp_seconds": round(dp.seconds, 2),
        "dp_metric": config.depth_metric,
        "dp_calibration_loss": {str(m): round(v, 5) for m, v in dp.scores.items()},
        "width_seconds": round(width_seconds, 2),
        "block_influence": [round(v, 6) for v in bi_values],
        "calibration_tokens": {"width": int(width_rows.numel()), "depth": int(depth_rows.numel())},
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    return Plan(model_dir=str(model_dir), dims=elastic.dims, config=config,
                depth_tables={m: s.kept(n) for m, s in searches.items()}, rankings=rankings, stats=stats,
                calibration_rows=width_rows, layer_covariances=covariances)


def choice_scorer(elastic, tokenizer, task_name: str) -> SuffixChoiceError:
    """The DP's multiple-choice metric on a BIG-bench JSON task (read from the cached sdist)."""
    from ..evaluation.tasks import load_bigbench_task, split_encode

    task = load_bigbench_task(task_name)
    items = [([split_encode(tokenizer, ex.prompt, c) for c in ex.choices], ex.correct) for ex in task.examples]
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return SuffixChoiceError(elastic, items, pad_id=pad)
