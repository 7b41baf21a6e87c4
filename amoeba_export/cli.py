"""``amoeba``: a thin dispatcher; each verb's module is imported only when that verb runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module under amoeba_export.commands, one-line help). Order = order in --help.
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "fetch the default model and text corpora into the cache (offline after this)"),
    "plan": ("plan", "compute depth (DP) and width (importance) plans for a model"),
    "extract": ("extract", "extract a subnet of a plan or elastic checkpoint as a plain HF folder"),
    "eval": ("eval", "held-out perplexity of a model folder or of plan shapes"),
    "train": ("train", "elastic fine-tune: mixture of LoRAs + in-place distillation (accelerate)"),
    "export": ("export", "export an HF folder with a backend (gguf, onnx, executorch) and quantize"),
    "validate": ("validate", "check an exported artifact against its PyTorch reference (gates)"),
    "bench": ("bench", "benchmark an exported artifact on this machine"),
    "targets": ("targets", "list the device profiles"),
    "search": ("search", "find the best shape for a device target's budgets"),
    "deploy": ("deploy", "search → extract → export → validate → bench → report for a target"),
    "demo": ("demo", "the main job on the shipped default model"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amoeba",
        description="amoeba-export: elastic subnets of Llama-family LLMs, exported to ONNX, GGUF and "
        "ExecuTorch, validated and benchmarked.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:  # only the chosen verb's module is imported
            _module(module).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"amoeba_export.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    from .errors import AmoebaError

    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(_module(VERBS[args.verb][0]).run(args) or 0)
    except AmoebaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
