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
    from ..demo import format_table, run_demo

    rows = run_demo(args.model, eval_tokens=args.eval_tokens)
    print()
    print(format_table(rows))
    if args.deploy is not None:
        from ..deploy.demo import DEMO_TARGETS, deploy_demo

        reports = deploy_demo(args.model, targets=tuple(args.deploy) or DEMO_TARGETS,
                              finetune_steps=args.finetune_steps)
        for target, report in zip(tuple(args.deploy) or DEMO_TARGETS, reports):
            print(f"report ({target}): {report}")
    return 0
