"""``amoeba search SOURCE --target T``: the accuracy–efficiency frontier and the best shape within budgets."""

from __future__ import annotations

import argparse


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="a shipped profile name (see `amoeba targets`) or a .toml file")
    p.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help="override a budget: max_file_mb, max_memory_mb or min_decode_tok_s (repeatable)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens per candidate shape")


def profile_from_args(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..targets import load_profile

    profile = load_profile(args.target)
    overrides, problems = {}, []
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            problems.append(f"--budget {item!r} is not NAME=NUMBER")
    if problems:
        raise ConfigError("budget overrides", problems, fix="write e.g. --budget max_file_mb=60")
    return profile.with_budgets(**overrides) if overrides else profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a plan folder or a trained elastic checkpoint")
    add_budget_arguments(p)
    p.add_argument("--json", help="also write the full result to this JSON file")


def run(args: argparse.Namespace) -> int:
    from ..artifacts import write_json
    from ..deploy.search import require_choice, search

    profile = profile_from_args(args)
    result = search(args.source, profile, eval_tokens=args.eval_tokens)
    print(result.table())
    cal = result.calibration
    print(f"speed model: s/token = a + b·W fitted on {len(cal['points'])} subnets benched here "
          f"({cal['threads']} threads); * = on the frontier")
    if args.json:
        write_json(args.json, result.to_dict())
    best = require_choice(result)
    print(f"best for {profile.name}: {best.name} ({best.params:,} params, held-out ppl {best.ppl:.3f}, "
          f"~{best.file_bytes / 1e6:.1f} MB, ~{best.decode_tok_s:.0f} tok/s predicted)")
    return 0
