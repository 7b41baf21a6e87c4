"""``amoeba demo``: the main job on the shipped default model (see amoeba_export.demo)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")


def run(args: argparse.Namespace) -> int:
    from ..demo import format_table, run_demo

    rows = run_demo(args.model, eval_tokens=args.eval_tokens)
    print()
    print(format_table(rows))
    return 0
