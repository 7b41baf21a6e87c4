"""Does a one-token (static) ExecuTorch program decode as fast as the dynamic-shape one? Decode steps alternated.

Exports the same HF folder (default: SmolLM2-135M, or its first ``--layers``) with one recipe twice, each in a
fresh process with its default threads (as ``amoeba deploy`` exports): ``dynamic_shape=true`` (what artifacts
ship) and ``false`` (what the deploy search's speed calibration exports, ``ExecuTorchBackend.speed_twin``).
Then loads both programs in one process and decodes with them in turn, one step each, ``--steps`` steps a
round, the order swapped every step: on a shared VM whose speed drifts minute to minute, separate runs
disagree by up to 2×, alternating steps see the same drift. Reports each program's median milliseconds per
decode step, file size and export seconds; ends with ``RESULT {json}``.

    python bench/executorch_static_decode.py [--layers 30] [--recipe 8da4w-attn] [--steps 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def first_layers(n: int, out: Path) -> Path:
    """The default model cut to its first ``n`` layers (all of them when ``n`` is its depth), as an HF folder."""
    from transformers import AutoTokenizer

    from amoeba_export.modelio import load_model
    from amoeba_export.resources import default_model_dir

    src = default_model_dir()
    model = load_model(src)
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = len(model.model.layers)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def export_fresh(hf: Path, out: Path, recipe: str, *, dynamic: bool = True) -> dict:
    """One ExecuTorch export in a fresh process (the deploy's ``export_in_child``, so its seconds and peak RSS are
    its own): ``{"export_s", "bytes"}``."""
    from amoeba_export.backends.export_process import export_in_child
    from amoeba_export.errors import AmoebaError

    try:
        art = export_in_child("executorch", hf, out, recipe, force=True, dynamic_shape=dynamic)
    except AmoebaError as exc:
        sys.exit(f"error: {exc}")
    return {"export_s": round(art.meta["export_seconds"], 1), "bytes": art.size_bytes}


def alternated_decode(artifacts: list[Path], *, steps: int, rounds: int, threads: int) -> list[list[float]]:
    """Seconds of each decode step of each ExecuTorch artifact, all loaded in this process and stepped in turn
    (one step each, the order swapped every step), ``steps`` steps a round from a 4-token prompt."""
    from amoeba_export.backends import get_backend
    from amoeba_export.backends.base import Artifact

    backend = get_backend("executorch")
    runners = [backend.load(Artifact.open(a), isolated=False, threads=threads) for a in artifacts]
    times: list[list[float]] = [[] for _ in runners]
    prompt = [1, 2, 3, 4]
    for _ in range(rounds):
        for runner in runners:
            runner._step(prompt, 0)  # each program's own cache, refilled from position 0 every round
        for i in range(steps):
            order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))
            for j in order:
                start = time.perf_counter()
                runners[j]._step([5 + i % 100], len(prompt) + i)
                times[j].append(time.perf_counter() - start)
    for runner in runners:
        runner.close()
    return times


def export_and_alternate(sources: dict[str, tuple[Path, bool]], work: Path, args) -> dict:
    """Export each ``name: (hf folder, dynamic)`` under ``work`` in a fresh process, then decode them alternated:
    ``{name}_export_s``, ``{name}_bytes`` and ``{name}_ms_per_token`` (median) per source."""
    result = {}
    for name, (hf, dynamic) in sources.items():
        meta = export_fresh(hf, work / name, args.recipe, dynamic=dynamic)
        result[f"{name}_export_s"], result[f"{name}_bytes"] = meta["export_s"], meta["bytes"]
    times = alternated_decode([work / n for n in sources], steps=args.steps, rounds=args.rounds, threads=args.threads)
    for name, ts in zip(sources, times):
        result[f"{name}_ms_per_token"] = round(1e3 * statistics.median(ts), 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="first layers of the default model (30: all)")
    ap.add_argument("--recipe", default="8da4w-attn")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per round and program")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    kinds = ("static", "dynamic")
    result: dict = {"layers": args.layers, "recipe": args.recipe, "threads": args.threads,
                    "steps": args.steps * args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        hf = first_layers(args.layers, Path(tmp) / "hf")
        result |= export_and_alternate({k: (hf, k == "dynamic") for k in kinds}, Path(tmp), args)
    result["static_over_dynamic"] = round(result["static_ms_per_token"] / result["dynamic_ms_per_token"], 4)
    result["export_speedup"] = round(result["dynamic_export_s"] / result["static_export_s"], 2)
    print(f"decode, median ms per step over {result['steps']} alternated steps: static "
          f"{result['static_ms_per_token']} / dynamic {result['dynamic_ms_per_token']} "
          f"(static/dynamic {result['static_over_dynamic']}); export {result['static_export_s']} / "
          f"{result['dynamic_export_s']} s; file {result['static_bytes']} / {result['dynamic_bytes']} bytes")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
