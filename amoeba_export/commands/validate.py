"""``amoeba validate ARTIFACT --reference HF_DIR``: accuracy gates of an exported artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from amoeba_export.errors import ValidationFailedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an artifact folder written by `amoeba export`")
    add_validation_arguments(parser)


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", help="the PyTorch reference HF folder (default: the exported folder)")
    parser.add_argument("--text-file", help="a .txt or .jsonl file to validate on (default: the held-out split)")
    parser.add_argument("--max-tokens", type=int, help="tokens of text to compare (default 2048)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 512)")
    parser.add_argument("--gates", help="a gates JSON file (default: the shipped gates.json)")
    parser.add_argument("--threads", type=int, help="threads for both models (default: all cores)")
    parser.add_argument("--report", help="also write the report as JSON to this file")


def validate_and_print(artifact: str | Path, args: argparse.Namespace) -> int:
    """Run validation, print the table (and JSON), and raise ValidationFailedError when a gate fails."""
    from amoeba_export.artifacts import write_json
    from amoeba_export.backends.base import Artifact
    from amoeba_export.errors import ConfigError
    from amoeba_export.evaluation.validate import validate_artifact

    # Not the default model when the record names no source: that would validate against an unrelated model.
    reference = args.reference or Artifact.open(artifact).source_hf_dir
    if not reference:
        raise ConfigError("validate", [f"{artifact}/meta.json records no source folder"],
                          fix="pass --reference HF_DIR")
    report = validate_artifact(artifact, reference, text_file=args.text_file, max_tokens=args.max_tokens,
                               seq_len=args.seq_len, gates_file=args.gates, threads=args.threads,
                               raise_on_fail=False)
    print(report.table())
    if args.report:
        write_json(args.report, report.to_dict())
    if not report.passed:
        raise ValidationFailedError(
            f"{report.backend}/{report.quant} failed its gate: "
            + "; ".join(c.describe() for c in report.failures),
            fix="see the table above; a different quant type or a wider subnet may pass")
    return 0


def run(args: argparse.Namespace) -> int:
    code = validate_and_print(args.artifact, args)
    if args.report:
        print(f"report written to {args.report}")
    return code



