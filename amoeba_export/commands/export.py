"""``amoeba export HF_DIR --backend gguf --quant Q4_K_M --out DIR [--validate] [--bench]``."""

from __future__ import annotations

import argparse

from amoeba_export.errors import ConfigError

from .bench import add_bench_arguments, bench_and_print
from .validate import add_validation_arguments, validate_and_print


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an HF model folder, a .gguf to convert, or 'default'")
    parser.add_argument("--backend", default="gguf", help="gguf, onnx, executorch or pytorch (default gguf)")
    parser.add_argument("--quant", help="quant type (default: the backend's default)")
    parser.add_argument("--out", required=True, help="artifact folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend-specific export option (repeatable), e.g. pre_tokenizer=smollm")
    parser.add_argument("--validate", action="store_true", help="validate against the source model (gates)")
    parser.add_argument("--bench", action="store_true", help="benchmark the artifact")
    add_validation_arguments(parser)
    add_bench_arguments(parser, threads=False)


BOOLEANS = {"true": True, "false": False}


def parse_options(pairs: list[str]) -> dict[str, object]:
    options, problems = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"{pair!r} is not KEY=VALUE")
            continue
        # true/false become booleans: backends check flags such as group_fallback for a bool, not a string.
        options[key] = int(value) if value.isdigit() else BOOLEANS.get(value.lower(), value)
    if problems:
        raise ConfigError("--option", problems, fix="write each option as KEY=VALUE")
    return options


def run(args: argparse.Namespace) -> int:
    from amoeba_export.backends import get_backend
    from amoeba_export.modelio import resolve_model

    hf_dir = resolve_model(args.model)
    backend = get_backend(args.backend)
    quant = args.quant or backend.default_quant
    artifact = backend.export(hf_dir, args.out, quant, force=args.force, **parse_options(args.option))
    meta = artifact.meta
    label = meta.get("quant_label") or artifact.quant  # e.g. "Q4_K_M (92 % Q5_0/Q8_0 fallback)"
    print(f"exported {hf_dir} → {artifact.path} ({backend.name}/{label}, {meta['model_bytes'] / 1e6:.1f} MB, "
          f"{meta['export_seconds']:.1f} s, peak RSS {meta['export_peak_rss_gb']} GiB)")
    for note in meta.get("notes", []):
        print(f"note: {note}")
    if args.validate:
        args.reference = args.reference or str(hf_dir)
        validate_and_print(artifact.path, args)
    if args.bench:
        bench_and_print(artifact.path, args)
    return 0
