"""``amoeba bench ARTIFACT``: speed and memory of an exported artifact, each repeat in a fresh process."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an artifact folder written by `amoeba export`")
    add_bench_arguments(parser)


def add_bench_arguments(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    if threads:  # `amoeba export` already has --threads from the validation options
        parser.add_argument("--threads", type=int, help="runtime threads (default: all cores)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for TTFT/prefill (128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to decode (128)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats; the median is reported (3)")
    parser.add_argument("--bench-json", help="also write the result as JSON to this file")


def bench_and_print(artifact: str | Path, args: argparse.Namespace) -> dict:
    from amoeba_export.artifacts import write_json
    from amoeba_export.benchmark import bench_artifact, format_table

    result = bench_artifact(artifact, threads=args.threads, prompt_tokens=args.prompt_tokens,
                            new_tokens=args.new_tokens, repeats=args.repeats)
    print(format_table(result))
    if args.bench_json:
        write_json(args.bench_json, result)
    return result


def run(args: argparse.Namespace) -> int:
    bench_and_print(args.artifact, args)
    return 0
