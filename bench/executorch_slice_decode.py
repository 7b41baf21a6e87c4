"""How much faster does a ≈50 %-parameter subnet's ``.pte`` decode than the full model's? Decode steps alternated.

The full default model (SmolLM2-135M) and ``bench/executorch_speed.py``'s ≈50 % per-layer slice (first channels:
speed depends on the widths, not on which channels are kept), both exported with one recipe and dynamic shapes
(what artifacts ship), each export in a fresh process. Both programs are then loaded in one process and decode
in turn, one step each, the order swapped every step (``executorch_static_decode.export_and_alternate``): separate
runs on a shared VM drift up to 2× within minutes, alternated steps see the same drift. Reports each program's
median milliseconds per decode step and the slice's speed-up; ends with ``RESULT {json}``.

    python bench/executorch_slice_decode.py [--recipe 8da4w-attn] [--steps 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from executorch_speed import SLICE_KV, SLICE_LAYERS, SLICE_MLP, SLICE_Q
from executorch_static_decode import export_and_alternate


def write_slice(out: Path) -> tuple[Path, float]:
    """The ≈50 % slice of the default model as an HF folder, and its fraction of the full model's parameters."""
    from amoeba_export.elastic import make_elastic
    from amoeba_export.extract import write_subnet
    from amoeba_export.modelio import load_model
    from amoeba_export.resources import default_model_dir
    from amoeba_export.shape import ModelDims, Shape

    hf = default_model_dir()
    model = load_model(hf)
    dims = ModelDims.from_config(model.config)
    shape = Shape(SLICE_LAYERS, SLICE_Q, SLICE_KV, SLICE_MLP, name="slice50").validate(dims)
    fraction = shape.num_params(dims) / sum(p.numel() for p in model.parameters())
    return write_subnet(make_elastic(model), shape, out, source_dir=hf, force=True), fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="8da4w-attn")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per round and program")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from amoeba_export.resources import default_model_dir

    result: dict = {"recipe": args.recipe, "threads": args.threads, "steps": args.steps * args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        slice_hf, result["slice_params_fraction"] = write_slice(Path(tmp) / "slice-hf")
        result |= export_and_alternate({"full": (default_model_dir(), True), "slice": (slice_hf, True)},
                                       Path(tmp), args)
    result["slice_speedup"] = round(result["full_ms_per_token"] / result["slice_ms_per_token"], 3)
    result["slice_params_fraction"] = round(result["slice_params_fraction"], 4)
    print(f"decode, median ms per step over {result['steps']} alternated steps: full {result['full_ms_per_token']}"
          f" / slice {result['slice_ms_per_token']} ({result['slice_params_fraction']:.1%} of the parameters): "
          f"slice speed-up {result['slice_speedup']}×")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
