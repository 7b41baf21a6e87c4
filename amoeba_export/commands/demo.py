"""``amoeba demo``: the main job on the shipped default model (see amoeba_export.demo)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--deploy", nargs="*", metavar="TARGET",
                   help="then deploy to device targets (default: laptop android-8gb) and write reports")
    p.add_argument("--finetune-steps", type=int, default=0, help="with --deploy: elastic fine-tune steps first")


def run(args: argparse.Namespace) -> int:
    import time

    from ..demo import format_table, run_demo
    from ..deploy.demo import DEMO_TARGETS, Timing, deploy_demo, format_timings

    started = time.perf_counter()
    rows = run_demo(args.model, eval_tokens=args.eval_tokens)
    # The table's part: the plan (computed or reused), the subnets and their perplexities and speeds.
    timings = [Timing("plan + subnet table", time.perf_counter() - started, True)]
    print()
    print(format_table(rows))
    if args.deploy is not None:
        reports = deploy_demo(args.model, targets=tuple(args.deploy) or DEMO_TARGETS,
                              finetune_steps=args.finetune_steps, timings=timings)
        for target, report in zip(tuple(args.deploy) or DEMO_TARGETS, reports):
            print(f"report ({target}): {report}")
    print()
    print(format_timings(timings))
    return 0
