"""``amoeba extract``: one shape of a plan or trained elastic checkpoint as a plain HF folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="plan folder (amoeba plan) or elastic checkpoint (amoeba train)")
    p.add_argument("--out", required=True, help="subnet folder to write")
    p.add_argument("--depth", type=int, help="number of layers to keep")
    p.add_argument("--width", type=float, default=1.0, help="width ratio in (0, 1]")
    p.add_argument("--mode", choices=("global", "uniform"), default="global",
                   help="global: per-layer widths by importance; uniform: the same ratio in every layer")
    p.add_argument("--params", type=float, help="pick the largest plan shape with at most this many parameters")
    p.add_argument("--round-to", type=int, help="MLP widths are multiples of this (e.g. 256 for GGUF k-quants)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compensate", dest="compensate", action="store_true", default=None,
                      help="add bias compensation for removed channels")
    comp.add_argument("--no-compensate", dest="compensate", action="store_false")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    import time

    from ..artifacts import read_meta
    from ..extract import extract_subnet

    start = time.perf_counter()
    out = extract_subnet(args.source, args.out, depth=args.depth, width=args.width, mode=args.mode,
                         params=int(args.params) if args.params else None, compensate=args.compensate,
                         round_to=args.round_to, force=args.force)
    meta = read_meta(out)
    kind = "stock" if meta["stock"] else "per-layer (amoeba_llama)"
    print(f"wrote {out}: {meta['shape']['name']}, {meta['params']:,} parameters, {kind} checkpoint, "
          f"{time.perf_counter() - start:.2f} s")
    return 0
