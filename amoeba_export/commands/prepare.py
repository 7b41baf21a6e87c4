"""``amoeba prepare``: fetch the default model and text corpora once; everything after runs offline."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model to prepare (default: SmolLM2-135M-Instruct)")


def run(args: argparse.Namespace) -> int:
    from ..data import SPLITS, split_tokens, text_dir
    from ..modelio import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    print(f"model: {model_dir}")
    print(f"text splits: {text_dir()}")
    tok = load_tokenizer(model_dir)
    for split in SPLITS:
        print(f"  {split}: {split_tokens(split, tok).numel():,} tokens")
    return 0
