"""Does a one-token (static) ExecuTorch program decode as fast as the dynamic-shape one? Decode steps alternated.

Exports the same HF folder (default: SmolLM2-135M, or its first ``--layers``) with one recipe twice, each in a
fresh process: ``dynamic_shape=true`` (what artifacts ship) and ``false`` (what the deploy search's speed
calibration exports, ``ExecuTorchBackend.speed_twin``). Then loads both programs in one process and decodes
with them in turn, one step each, ``--steps`` steps a round, the order swapped every step: on a shared VM whose
speed drifts minute to minute, separate runs disagree by up to 2×, alternating steps see the same drift. Reports
each program's median milliseconds per decode step, file size and export seconds; ends with ``RESULT {json}``.

    python bench/executorch_static_decode.py [--layers 30] [--recipe 8da4w-attn] [--steps 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[5]))
from pathlib import Path
from amoeba_export.backends import get_backend
art = get_backend("executorch").export(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], force=True,
                                       dynamic_shape=sys.argv[4] == "dynamic")
print("META " + json.dumps({"export_s": art.meta["export_seconds"], "bytes": art.size_bytes}))
"""


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="first layers of the default model (30: all)")
    ap.add_argument("--recipe", default="8da4w-attn")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per round and program")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from amoeba_export.backends import get_backend
    from amoeba_export.backends.base import Artifact

    torch.set_num_threads(args.threads)
    kinds = ("static", "dynamic")
    result: dict = {"layers": args.layers, "recipe": args.recipe, "threads": args.threads,
                    "steps": args.steps * args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        hf = first_layers(args.layers, Path(tmp) / "hf")
        for kind in kinds:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(hf), str(Path(tmp) / kind), args.recipe, kind,
                                   str(args.threads)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: the {kind} export failed: {proc.stderr[-1500:]}")
            meta = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("META "))[5:])
            result[f"{kind}_export_s"], result[f"{kind}_bytes"] = round(meta["export_s"], 1), meta["bytes"]
        backend = get_backend("executorch")
        runners = [backend.load(Artifact.open(Path(tmp) / k), isolated=False, threads=args.threads) for k in kinds]
        times: list[list[float]] = [[], []]
        prompt = [1, 2, 3, 4]
        for _ in range(args.rounds):
            for runner in runners:
                runner._step(prompt, 0)  # each program's own cache, refilled from position 0 every round
            for i in range(args.steps):
                for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                    start = time.perf_counter()
                    runners[j]._step([5 + i % 100], len(prompt) + i)
                    times[j].append(time.perf_counter() - start)
        for runner in runners:
            runner.close()
    for kind, ts in zip(kinds, times):
        result[f"{kind}_ms_per_token"] = round(1e3 * statistics.median(ts), 3)
    result["static_over_dynamic"] = round(result["static_ms_per_token"] / result["dynamic_ms_per_token"], 4)
    result["export_speedup"] = round(result["dynamic_export_s"] / result["static_export_s"], 2)
    print(f"decode, median ms per step over {result['steps']} alternated steps: static "
          f"{result['static_ms_per_token']} / dynamic {result['dynamic_ms_per_token']} "
          f"(static/dynamic {result['static_over_dynamic']}); export {result['static_export_s']} / "
          f"{result['dynamic_export_s']} s; file {result['static_bytes']} / {result['dynamic_bytes']} bytes")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
