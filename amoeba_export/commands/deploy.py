"""``amoeba deploy SOURCE --target T --out DIR``: search → extract → export → validate → bench → report."""

from __future__ import annotations

import argparse

from .search import add_budget_arguments, profile_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a plan folder or a trained elastic checkpoint")
    add_budget_arguments(p)
    p.add_argument("--out", required=True, help="deploy folder (re-running resumes it stage by stage)")
    p.add_argument("--validate-tokens", type=int, default=1024, help="held-out tokens for the accuracy gates")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--force", action="store_true", help="replace a deploy folder made for another request")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..deploy.pipeline import DeployOptions, deploy, load_manifest

    opts = DeployOptions(eval_tokens=args.eval_tokens, validate_tokens=args.validate_tokens,
                         bench_repeats=args.bench_repeats, progress=not args.quiet)
    report = deploy(args.source, profile_from_args(args), args.out, options=opts, force=args.force)
    s = load_manifest(args.out)["stages"]["report"]
    print(f"file size: predicted {s['predicted_file_bytes'] / 1e6:.3f} MB, real {s['file_bytes'] / 1e6:.3f} MB "
          f"(error {100 * s['size_pred_err']:.2f} %)")
    print(f"decode: predicted {s['predicted_decode_tok_s']:.1f} tok/s, measured {s['decode_tok_s']:.1f} tok/s "
          f"(error {100 * s['speed_pred_err']:.1f} %)")
    print(f"report: {report}")
    return 0
