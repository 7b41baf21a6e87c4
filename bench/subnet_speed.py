"""Issue 2: real slicing gives real speed. Forward-pass time of extracted subnets vs the full model.

Same run, same inputs, interleaved repeats (this machine is noisy); eager PyTorch fp32. Also times
extraction of shapes written to disk.

    python bench/subnet_speed.py [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from amoeba_export.data import split_tokens
from amoeba_export.demo import ensure_plan
from amoeba_export.extract import extract_subnet
from amoeba_export.modelio import load_model, load_tokenizer, resolve_model
from amoeba_export.paths import cache_subdir
from amoeba_export.plan import load_elastic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    plan_dir = cache_subdir("demo") / "plan"
    plan = ensure_plan(model_dir, plan_dir)
    full_params = plan.params_for(plan.full_shape(), compensate=False)
    work = Path(tempfile.mkdtemp(prefix="subnet-speed-", dir=cache_subdir("bench")))

    # Extraction time: depth/width given (what `amoeba extract --depth --width` does), written to disk.
    extract_times = {}
    shapes = {"d22-w0.75-global": (22, 0.75, "global"), "d15-w0.5-uniform": (15, 0.5, "uniform"),
              "d30-w0.5-global": (30, 0.5, "global")}
    for name, (depth, width, mode) in shapes.items():
        t = time.perf_counter()
        extract_subnet(plan_dir, work / name, depth=depth, width=width, mode=mode)
        extract_times[name] = time.perf_counter() - t

    # ≈50 % of the parameters, chosen by calibration loss among one candidate per depth.
    elastic, _ = load_elastic(plan_dir)
    from amoeba_export.extract import pick_for_params, write_subnet

    half = pick_for_params(elastic, plan, int(full_params * 0.5))
    write_subnet(elastic, half, work / "half", source_dir=model_dir)
    del elastic

    models = {"full": load_model(model_dir), "50%": load_model(work / "half"),
              "d15-w0.5-uniform": load_model(work / "d15-w0.5-uniform")}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    ids = split_tokens("heldout", load_tokenizer(model_dir))[: args.tokens].unsqueeze(0)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids[:, :32], use_cache=False)
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every model alike
            for k, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'model':<20} {'params':>12} {'% full':>7} {'median s':>9} {'spread s':>9} {'speed-up':>9}")
    for k in models:
        print(f"{k:<20} {params[k]:>12,} {100 * params[k] / params['full']:>6.1f}% {med[k]:>9.3f} "
              f"{max(times[k]) - min(times[k]):>9.3f} {med['full'] / med[k]:>8.2f}×")
    print(f"50% shape: {half.name} ({half.describe()})")
    print("extraction to disk (s): " + ", ".join(f"{k} {v:.2f}" for k, v in extract_times.items()))
    print("RESULT " + json.dumps({
        "speedup_50pct": round(med["full"] / med["50%"], 3),
        "params_fraction_50pct": round(params["50%"] / params["full"], 4),
        "shape_50pct": half.name,
        "speedup_d15_w05_uniform": round(med["full"] / med["d15-w0.5-uniform"], 3),
        "extract_seconds": round(max(extract_times.values()), 3),
        "extract_seconds_each": {k: round(v, 3) for k, v in extract_times.items()},
        "tokens": args.tokens, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
