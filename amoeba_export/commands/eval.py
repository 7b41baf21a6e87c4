"""``amoeba eval``: held-out perplexity of an HF folder (or a text file's perplexity)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model folder (a subnet, or 'default')")
    p.add_argument("--text", help="a .txt/.jsonl file instead of the held-out split (rows spread over it too)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to evaluate")
    p.add_argument("--seq-len", type=int, default=512)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..data import measurement_rows
    from ..evaluation.perplexity import hf_logits_fn, perplexity
    from ..modelio import load_model, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    measured = measurement_rows(Path(args.text) if args.text else "heldout", tok, args.seq_len, args.tokens)
    model = load_model(path)
    with torch.no_grad():
        ppl = perplexity(hf_logits_fn(model), measured.rows)
    print(measured.quote(ppl))
    return 0
