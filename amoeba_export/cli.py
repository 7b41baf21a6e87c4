"""``amoeba``: a thin dispatcher; each verb's module is imported only when that verb runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import warnings

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


# Third-party log lines that print on every command and mean nothing to a user, as (logger, text it contains,
# why it is noise). Filtered by message, not by silencing the loggers: their other warnings still show.
NOISE: tuple[tuple[str, str, str], ...] = (
    # transformers imports torchao's quantizer when it loads any model; torchao then tries its CUDA-only kernel
    # libraries (_C_cutlass_90a, _C_mxfp8) and logs each failure on a CPU machine.
    ("torchao", "Failed to load", "CUDA-only kernels on a machine without CUDA"),
    # torchao registers its config enums with torch's pytree, which now warns that this is unneeded.
    ("torch.utils._pytree", "register_constant()", "a deprecation inside torchao, not in our code"),
)


# Python warnings of the same kind, as (category, start of the message, why): ExecuTorch's exporter raises them once
# per traced op, dozens of lines in every `amoeba export --backend executorch`.
WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, "_check_is_size will be removed", "inside ExecuTorch's llama custom ops, not in our code"),
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated", "torch's pytree, reached from ExecuTorch"),
    # the KV cache is the mutated buffer; every position is written before it is read, so its initial state
    # not being serialized is what we want
    (UserWarning, "Mutation on a buffer in the model is detected", "the KV cache, written before it is read"),
)


class _DropNoise(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party_noise() -> None:
    """Install the :data:`NOISE` and :data:`WARNING_NOISE` filters (idempotent)."""
    for name, text, _why in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNoise(text))
    for category, start, _why in WARNING_NOISE:
        # filterwarnings matches the message's start (a regex): the text is escaped, and adding the same filter
        # again replaces it rather than stacking
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)


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
    quiet_third_party_noise()
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
