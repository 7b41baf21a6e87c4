"""How long ExecuTorch lowering takes with XNNPACK's passes filtered to those that can act, vs the full list.

Exports one HF folder (default: SmolLM2-135M) with one recipe twice, each in a fresh process, one after the
other: with ``backends/executorch/xnnpack_passes.py``'s filter (what ``amoeba export`` does) and with ExecuTorch's
full pass list. Reports each export's stage seconds and whether the two ``.pte`` files are byte-identical (they
must be: the filter skips only passes that cannot change the partition). Ends with one line ``RESULT {json}``.

    python bench/lowering_time.py [--recipe 8da4w-attn] [--model default|<hf folder>] [--threads 2]

The recipe defaults to ``8da4w-attn``, the phone recipe's round-to-nearest twin: GPTQ changes codes, not the
graph, so it would add minutes of rounding without changing what is lowered.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import contextlib, json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
from pathlib import Path
from amoeba_export.backends.executorch import backend as et
if sys.argv[3] == "every":
    et.only_passes_that_can_act = contextlib.nullcontext
art = et.ExecuTorchBackend().export(Path(sys.argv[1]), Path(sys.argv[2]), quant=sys.argv[5], force=True)
print("STAGES " + json.dumps({k: v["seconds"] for k, v in art.meta["export_stages"].items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M)")
    ap.add_argument("--recipe", default="8da4w-attn")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from amoeba_export.resources import default_model_dir

    hf = default_model_dir() if args.model == "default" else Path(args.model)
    result: dict = {"model": str(hf), "recipe": args.recipe, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        digests = {}
        for passes in ("filtered", "every"):
            out = Path(tmp) / passes
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(hf), str(out), passes, str(args.threads),
                                   args.recipe], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: the {passes} export failed: {proc.stderr[-1500:]}")
            stages = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("STAGES "))[7:])
            digests[passes] = hashlib.sha256((out / "model.pte").read_bytes()).hexdigest()
            lowering = stages["to_edge_transform_and_lower"] + stages["to_executorch"]
            result[passes] = {"export_seconds": round(time.perf_counter() - started, 1),
                              "lowering_seconds": round(lowering, 1), "stages": stages}
            print(f"{passes:>8} passes: export {result[passes]['export_seconds']} s, lowering {lowering:.1f} s "
                  f"({stages})", flush=True)
    result["identical_pte"] = digests["filtered"] == digests["every"]
    result["lowering_ratio"] = round(result["filtered"]["lowering_seconds"] / result["every"]["lowering_seconds"], 3)
    print(f"lowering filtered / every: {result['lowering_ratio']}; identical .pte: {result['identical_pte']}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
