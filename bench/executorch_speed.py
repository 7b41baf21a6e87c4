"""ExecuTorch (.pte, XNNPACK) on the default model: recipes' size / accuracy / speed, and a ≈50 % subnet's speedup.

Measured in one run, side by side: every recipe exported (each in its own process, so its peak RSS is its
own), validated against the PyTorch model (top-1 agreement, KL, perplexity ratio) and, for PyTorch eager,
the full 8da4w .pte and the subnet's 8da4w .pte, benchmarked with the shared harness (prefill / decode
tok/s, fraction of the memory-bandwidth bound). Lowering is slow: the full run takes about an hour on 2 cores.

The speed comparisons use --speed-recipe (default 8da4w-attn, the 4-bit recipe that passes its gate on
SmolLM2-135M); the RESULT's q8da4w_* figures are the all-int4 8da4w recipe's, q8da4w_attn_* the speed recipe's.

usage: python bench/executorch_speed.py [--recipes fp32,8da4w,8da4w-attn,8da8w] [--speed-recipe 8da4w-attn]
       [--subnet DIR | --plan DIR] [--out DIR] [--max-tokens 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from amoeba_export.paths import cache_subdir

# A ≈50 %-parameter per-layer-width slice (first channels) of SmolLM2-135M, used when no plan is given:
# speed depends on the widths, not on which channels were kept.
SLICE_LAYERS = tuple(range(0, 26, 2)) + (29,)
SLICE_Q = (9, 6) * 7
SLICE_KV = (3,) * 14
SLICE_MLP = (1536, 1024) * 7


def export_one(hf: str, out: str, quant: str, max_context: int) -> None:
    """Child process: one export, so export_peak_rss_gb in its meta is this export's alone."""
    from amoeba_export.backends import get_backend

    get_backend("executorch").export(Path(hf), Path(out), quant, force=True, max_context=max_context)


def _export(hf: Path, out: Path, quant: str, max_context: int) -> dict:
    if not (out / "meta.json").is_file():
        subprocess.run([sys.executable, __file__, "--export-one", str(hf), str(out), quant, str(max_context)],
                       check=True)
    return json.loads((out / "meta.json").read_text())


def _subnet(args, hf: Path, work: Path) -> tuple[Path, str]:
    if args.subnet:
        return Path(args.subnet), "given"
    out = work / "subnet50"
    if (out / "meta.json").is_file():
        return out, "cached"
    if args.plan:
        from amoeba_export.extract import extract_subnet

        return extract_subnet(args.plan, out, depth=args.depth, width=args.width, mode="global", force=True), "plan"
    from amoeba_export.elastic import make_elastic
    from amoeba_export.extract import write_subnet
    from amoeba_export.modelio import load_model
    from amoeba_export.shape import ModelDims, Shape

    model = load_model(hf)
    shape = Shape(SLICE_LAYERS, SLICE_Q, SLICE_KV, SLICE_MLP, name="slice50").validate(
        ModelDims.from_config(model.config))
    return write_subnet(make_elastic(model), shape, out, source_dir=hf, force=True), "slice (no plan)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-one", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--recipes", default="fp32,8da4w,8da4w-attn,8da8w")
    p.add_argument("--speed-recipe", default="8da4w-attn", help="recipe of the .pte files benchmarked for speed")
    p.add_argument("--subnet", help="≈50 %% subnet HF folder (default: extract from --plan, else a slice)")
    p.add_argument("--plan", help="plan folder for extract_subnet")
    p.add_argument("--depth", type=int, default=20, help="subnet depth with --plan")
    p.add_argument("--width", type=float, default=0.6, help="subnet width with --plan")
    p.add_argument("--out", default=str(cache_subdir("bench") / "executorch"))
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=1024, help="held-out tokens for validation")
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.export_one:
        hf, out, quant, ctx = args.export_one
        export_one(hf, out, quant, int(ctx))
        return 0

    from amoeba_export.backends import get_backend
    from amoeba_export.benchmark.harness import bench_artifact, default_threads, measure_bandwidth
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.modelio import resolve_model

    hf = resolve_model("default")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or default_threads()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for needed in ("8da4w", args.speed_recipe):
        if needed not in recipes:
            recipes.append(needed)
    sr = args.speed_recipe

    rows = {}
    for quant in recipes:
        meta = _export(hf, work / f"full-{quant}", quant, args.max_context)
        report = validate_artifact(work / f"full-{quant}", hf, max_tokens=args.max_tokens, seq_len=256,
                                   raise_on_fail=False)
        rows[quant] = {"pte_mb": meta["model_bytes"] / 1e6, "export_s": meta["export_seconds"],
                       "lowering_s": meta["lowering_seconds"], "export_peak_rss_gb": meta["export_peak_rss_gb"],
                       "gate_passed": report.passed, **{k: report.metrics.get(k) for k in
                                                        ("top1_agreement", "mean_kl", "ppl_ratio",
                                                         "max_abs_logit_err")},
                       "notes": meta["notes"]}
        print(f"{quant}: {json.dumps(rows[quant])}", flush=True)

    sub, how = _subnet(args, hf, work)
    _export(sub, work / f"subnet-{sr}", sr, args.max_context)
    pt = work / "full-pytorch"
    if not (pt / "meta.json").is_file():
        get_backend("pytorch").export(hf, pt, "F32", force=True)

    bandwidth = measure_bandwidth(threads)
    speed = {name: bench_artifact(path, threads=threads, repeats=args.repeats, bandwidth=bandwidth)
             for name, path in (("pytorch", pt), (f"full-{sr}", work / f"full-{sr}"),
                                (f"subnet-{sr}", work / f"subnet-{sr}"))}

    def med(name, metric):
        return speed[name]["metrics"][metric]["median"]

    print(f"\n{'recipe':12} {'.pte MB':>8} {'top1':>6} {'KL':>7} {'ppl×':>6} {'gate':>5} {'export s':>9} {'RSS GB':>7}")
    for quant, r in rows.items():
        print(f"{quant:12} {r['pte_mb']:8.1f} {r['top1_agreement']:6.3f} {r['mean_kl']:7.4f} {r['ppl_ratio']:6.3f} "
              f"{'ok' if r['gate_passed'] else 'FAIL':>5} {r['export_s']:9.0f} {r['export_peak_rss_gb']:7.2f}")
    print(f"\n{'artifact':14} {'prefill tok/s':>13} {'decode tok/s':>12} {'bound frac':>10}")
    for name in speed:
        print(f"{name:14} {med(name, 'prefill_tok_s'):13.1f} {med(name, 'decode_tok_s'):12.1f} "
              f"{speed[name]['bound_fraction']:10.3f}")
    from amoeba_export.backends.meta import model_summary

    param_fraction = model_summary(sub)["params"] / model_summary(hf)["params"]
    speedup = med(f"subnet-{sr}", "decode_tok_s") / med(f"full-{sr}", "decode_tok_s")
    result = {
        "speedup_50pct": speedup,
        "subnet": how,
        "subnet_param_fraction": param_fraction,
        "speed_recipe": sr,
        "decode_vs_pytorch": med(f"full-{sr}", "decode_tok_s") / med("pytorch", "decode_tok_s"),
        "prefill_vs_pytorch": med(f"full-{sr}", "prefill_tok_s") / med("pytorch", "prefill_tok_s"),
        "fp32_top1": rows.get("fp32", {}).get("top1_agreement"),
        "q8da4w_ppl_ratio": rows["8da4w"]["ppl_ratio"],
        "q8da4w_top1": rows["8da4w"]["top1_agreement"],
        "q8da4w_kl": rows["8da4w"]["mean_kl"],
        "q8da4w_gate_passed": rows["8da4w"]["gate_passed"],
        "q8da4w_attn_ppl_ratio": rows[sr]["ppl_ratio"],
        "q8da4w_attn_top1": rows[sr]["top1_agreement"],
        "q8da4w_attn_kl": rows[sr]["mean_kl"],
        "q8da4w_attn_gate_passed": rows[sr]["gate_passed"],
        "bound_fraction": speed[f"full-{sr}"]["bound_fraction"],
        "bound_fraction_subnet": speed[f"subnet-{sr}"]["bound_fraction"],
        "export_peak_rss_gb": max(r["export_peak_rss_gb"] for r in rows.values()),
        "recipes": rows,
        "threads": threads,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
