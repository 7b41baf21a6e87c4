"""Elastic fine-tune gain on SmolLM2-135M (CPU): held-out perplexity of several shapes before and after
the SMoL + in-place-distillation fine-tune, and after two ablations at the same step count
(single LoRA, E=1; no loss-magnitude balancing).

CPU budget (2 cores, ≤ 30 min): a plan with ≤ 25 % of layers removable, ``--steps`` sandwich steps of
K=4 shapes at sequence 256, batch 1, LoRA rank 8, lr 1e-3 (a short run needs a larger step than the
paper's 2e-4 over 10K steps), held-out perplexity on ``--eval-tokens`` tokens of the held-out split.
On a GPU raise --steps. Ends with one line ``RESULT {json}``.

    python bench/finetune_gain.py [--steps 40] [--seq-len 256] [--eval-tokens 2048] [--threads N]
                                  [--plan-tokens 2048] [--max-removed 0.25]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    from amoeba_export.backends.meta import peak_rss_gb as own_peak

    return own_peak()


def finished_run(run: Path, config) -> bool:
    """A rerun of the bench reuses a variant that already finished with exactly this config."""
    meta = run / "meta.json"
    if not meta.is_file():
        return False
    m = json.loads(meta.read_text())
    return bool(m.get("final")) and m.get("train") == json.loads(json.dumps(config.to_dict()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plan-tokens", type=int, default=2048, help="calibration tokens for the width statistics")
    ap.add_argument("--max-removed", type=float, default=0.25, help="most layers the plan removes (fraction)")
    ap.add_argument("--work", default=None, help="work folder (default: <cache>/bench/finetune_gain)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from amoeba_export.data import measurement_rows
    from amoeba_export.evaluation.perplexity import perplexity
    from amoeba_export.finetune.checkpoint import load_trained_elastic
    from amoeba_export.finetune.config import SMoLConfig, TrainConfig
    from amoeba_export.finetune.model import merge_for_shape
    from amoeba_export.finetune.trainer import train
    from amoeba_export.modelio import load_tokenizer
    from amoeba_export.paths import cache_subdir
    from amoeba_export.plan import Plan, PlanConfig, build_plan, load_elastic
    from amoeba_export.resources import default_model_dir

    started = time.perf_counter()
    work = Path(args.work) if args.work else cache_subdir("bench", "finetune_gain")
    model_dir = default_model_dir()
    plan_config = PlanConfig(seq_len=256, width_tokens=args.plan_tokens, depth_tokens=256,
                             max_removed=args.max_removed)
    plan_dir = work / "plan"
    if (plan_dir / "meta.json").is_file() and Plan.load(plan_dir).config == plan_config:
        print(f"reusing plan {plan_dir}", file=sys.stderr)
    else:
        build_plan(model_dir, plan_config).save(plan_dir, force=True)
        for old in work.glob("run-*"):  # trained on the plan just replaced
            shutil.rmtree(old)
    plan = Plan.load(plan_dir)
    plan_seconds = time.perf_counter() - started

    tok = load_tokenizer(model_dir)
    rows = measurement_rows("heldout", tok, args.seq_len, args.eval_tokens).rows
    depths = sorted(plan.depth_table)
    mid = depths[len(depths) // 2]
    shapes = [plan.shape(depths[-1], 1.0), plan.shape(depths[-1], 0.75), plan.shape(mid, 0.625),
              plan.smallest_shape()]

    def ppl_of(elastic, shape, merged: bool) -> float:
        if merged:
            merge_for_shape(elastic, shape)
        return perplexity(lambda ids: elastic(ids, shape), rows)

    elastic, _ = load_elastic(plan_dir)
    before = {s.name: ppl_of(elastic, s, False) for s in shapes}
    del elastic

    base = TrainConfig(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=1, shapes_per_step=4,
                       save_every=max(args.steps, 1), log_every=1, smol=SMoLConfig(rank=args.rank))
    variants = {"smol": base, "single_lora": base.with_overrides(smol_experts=1),
                "no_balance": base.with_overrides(balance=False)}
    after: dict[str, dict[str, float]] = {}
    train_seconds: dict[str, float] = {}
    for name, cfg in variants.items():
        run = work / f"run-{name}"
        if finished_run(run, cfg):
            print(f"reusing finished run {run}", file=sys.stderr)
            train_seconds[name] = json.loads((run / "meta.json").read_text())["train_seconds"]
        else:
            train_seconds[name] = round(train(plan_dir, cfg, run, force=True).seconds, 1)
        trained, _, _ = load_trained_elastic(work / f"run-{name}")
        after[name] = {s.name: ppl_of(trained, s, True) for s in shapes}
        del trained

    table = []
    print(f"\n{'shape':<22}{'params':>12}{'before':>10}{'SMoL':>10}{'E=1':>10}{'no-bal':>10}")
    for s in shapes:
        row = {"name": s.name, "params": plan.params_for(s), "ppl_before": round(before[s.name], 3),
               "ppl_after": round(after["smol"][s.name], 3),
               "ppl_single_lora": round(after["single_lora"][s.name], 3),
               "ppl_no_balance": round(after["no_balance"][s.name], 3)}
        table.append(row)
        print(f"{s.name:<22}{row['params']:>12,}{row['ppl_before']:>10.2f}{row['ppl_after']:>10.2f}"
              f"{row['ppl_single_lora']:>10.2f}{row['ppl_no_balance']:>10.2f}")
    improved = all(r["ppl_after"] < r["ppl_before"] for r in table)
    gains = [r["ppl_before"] - r["ppl_after"] for r in table]
    smallest_most = gains[-1] == max(gains)
    print(f"every shape improved: {improved}; smallest improved most (absolute): {smallest_most}")
    rss = peak_rss_gb()
    print(f"peak RSS {rss:.2f} GB; train seconds {train_seconds}; total {time.perf_counter() - started:.0f} s")
    result = {"model": "SmolLM2-135M-Instruct", "steps": args.steps, "seq_len": args.seq_len, "batch_size": 1,
              "shapes_per_step": 4, "rank": args.rank, "experts": base.smol.experts, "lr": args.lr,
              "eval_tokens": int(rows.numel()), "threads": torch.get_num_threads(), "shapes": table,
              "every_shape_improved": improved, "smallest_improved_most": smallest_most,
              "train_seconds": train_seconds, "plan_seconds": round(plan_seconds, 1),
              "total_seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": round(rss, 3)}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
