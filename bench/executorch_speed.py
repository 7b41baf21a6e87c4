"""ExecuTorch (.pte, XNNPACK) on the default model: recipes' size / accuracy / speed, the new module against the
previous one, and a ≈50 % subnet's speedup.

Measured in one run, side by side: every recipe exported with the ``custom`` attention (ExecuTorch's
update_cache + custom_sdpa, last-token logits; each export in its own process, so its peak RSS is its own),
validated against the PyTorch model (top-1 agreement, KL, perplexity ratio); then PyTorch eager, the full
--speed-recipe .pte with the new module, the same recipe with the previous ``masked`` module (the baseline:
attention over the whole cache, every prompt token's logits) and the subnet's .pte, benchmarked with the shared
harness (prefill / decode tok/s, fraction of the memory-bandwidth bound). Export seconds and peak RSS per stage
come from each artifact's meta.json (``export_stages``).

The speed comparisons use --speed-recipe (default 8da4w-attn, the 4-bit recipe that passes its gate on
SmolLM2-135M); the RESULT's q8da4w_* figures are the all-int4 8da4w recipe's (when --recipes runs it),
q8da4w_attn_* the speed recipe's. Every export is cached under --out (keyed by recipe and attention), so a
rerun lowers only what is missing.

usage: python bench/executorch_speed.py [--recipes fp32,8da4w,8da4w-attn,8da8w] [--speed-recipe 8da4w-attn]
       [--baseline-attention masked | --no-baseline] [--subnet DIR | --plan DIR | --no-subnet] [--out DIR]
       [--max-tokens 1024] [--threads N]
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


def export_one(hf: str, out: str, quant: str, max_context: int, attention: str) -> None:
    """Child process: one export, so export_peak_rss_gb in its meta is this export's alone."""
    from amoeba_export.backends import get_backend

    get_backend("executorch").export(Path(hf), Path(out), quant, force=True, max_context=max_context,
                                     attention=attention)


def _export(hf: Path, out: Path, quant: str, max_context: int, attention: str = "custom") -> dict:
    meta = out / "meta.json"
    # An artifact without "attention" in its meta predates the custom module: export again.
    if not meta.is_file() or json.loads(meta.read_text()).get("attention") != attention:
        subprocess.run([sys.executable, __file__, "--export-one", str(hf), str(out), quant, str(max_context),
                        attention], check=True)
    return json.loads(meta.read_text())


def _export_row(meta: dict) -> dict:
    """Export seconds (whole and per stage) and peak RSS of one artifact, from its meta.json."""
    return {"export_s": meta["export_seconds"], "lowering_s": meta["lowering_seconds"],
            "export_peak_rss_gb": meta["export_peak_rss_gb"],
            "stages": {k: v["seconds"] for k, v in meta.get("export_stages", {}).items()},
            "stage_peak_rss_gb": {k: v["peak_rss_gb"] for k, v in meta.get("export_stages", {}).items()}}


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
    p.add_argument("--export-one", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--model", default="default", help="source model (a local HF folder smoke-tests the script)")
    p.add_argument("--recipes", default="fp32,8da4w,8da4w-attn,8da8w")
    p.add_argument("--speed-recipe", default="8da4w-attn", help="recipe of the .pte files benchmarked for speed")
    p.add_argument("--baseline-attention", default="masked", help="attention of the baseline .pte")
    p.add_argument("--no-baseline", action="store_true", help="skip the previous module's .pte")
    p.add_argument("--no-subnet", action="store_true", help="skip the ≈50 %% subnet (one lowering less)")
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
        hf, out, quant, ctx, attention = args.export_one
        export_one(hf, out, quant, int(ctx), attention)
        return 0

    from amoeba_export.backends import get_backend
    from amoeba_export.benchmark.harness import bench_artifact, default_threads, measure_bandwidth
    from amoeba_export.evaluation.validate import validate_artifact
    from amoeba_export.modelio import resolve_model

    hf = resolve_model(args.model)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or default_threads()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    sr = args.speed_recipe
    if sr not in recipes:
        recipes.append(sr)
    base = args.baseline_attention

    rows = {}
    for quant in recipes:
        meta = _export(hf, work / f"full-{quant}-custom", quant, args.max_context)
        report = validate_artifact(work / f"full-{quant}-custom", hf, max_tokens=args.max_tokens, seq_len=256,
                                   raise_on_fail=False)
        rows[quant] = {"pte_mb": meta["model_bytes"] / 1e6, **_export_row(meta),
                       "gate_passed": report.passed, **{k: report.metrics.get(k) for k in
                                                        ("top1_agreement", "mean_kl", "ppl_ratio",
                                                         "max_abs_logit_err")},
                       "notes": meta["notes"]}
        print(f"{quant}: {json.dumps(rows[quant])}", flush=True)

    targets = {f"full-{sr}": work / f"full-{sr}-custom"}
    baseline = None
    if not args.no_baseline:
        baseline = _export_row(_export(hf, work / f"full-{sr}-{base}", sr, args.max_context, base))
        targets[f"full-{sr}-{base}"] = work / f"full-{sr}-{base}"
        print(f"baseline {base}: {json.dumps(baseline)}", flush=True)
    sub, how = (None, "skipped") if args.no_subnet else _subnet(args, hf, work)
    if sub is not None:
        _export(sub, work / f"subnet-{sr}-custom", sr, args.max_context)
        targets[f"subnet-{sr}"] = work / f"subnet-{sr}-custom"
    pt = work / "full-pytorch"
    if not (pt / "meta.json").is_file():
        get_backend("pytorch").export(hf, pt, "F32", force=True)

    bandwidth = measure_bandwidth(threads)
    speed = {name: bench_artifact(path, threads=threads, repeats=args.repeats, bandwidth=bandwidth)
             for name, path in (("pytorch", pt), *targets.items())}

    def med(name, metric):
        return speed[name]["metrics"][metric]["median"]

    def ratio(a, b, metric="decode_tok_s"):
        return med(a, metric) / med(b, metric) if a in speed and b in speed else None

    print(f"\n{'recipe':12} {'.pte MB':>8} {'top1':>6} {'KL':>7} {'ppl×':>6} {'gate':>5} {'export s':>9} {'RSS GB':>7}")
    for quant, r in rows.items():
        print(f"{quant:12} {r['pte_mb']:8.1f} {r['top1_agreement']:6.3f} {r['mean_kl']:7.4f} {r['ppl_ratio']:6.3f} "
              f"{'ok' if r['gate_passed'] else 'FAIL':>5} {r['export_s']:9.0f} {r['export_peak_rss_gb']:7.2f}")
    print(f"\nexport seconds per stage ({sr}): " + json.dumps(rows[sr]["stages"])
          + (f"; baseline {base}: " + json.dumps(baseline["stages"]) if baseline else ""))
    print(f"\n{'artifact':22} {'prefill tok/s':>13} {'decode tok/s':>12} {'bound frac':>10}")
    for name in speed:
        print(f"{name:22} {med(name, 'prefill_tok_s'):13.1f} {med(name, 'decode_tok_s'):12.1f} "
              f"{speed[name]['bound_fraction']:10.3f}")
    from amoeba_export.backends.meta import model_summary

    new, old, subnet = f"full-{sr}", f"full-{sr}-{base}", f"subnet-{sr}"
    q4 = rows.get("8da4w", {})
    result = {
        "speedup_50pct": ratio(subnet, new),
        "subnet": how,
        "subnet_param_fraction": model_summary(sub)["params"] / model_summary(hf)["params"] if sub else None,
        "speed_recipe": sr,
        "decode_tok_s": med(new, "decode_tok_s"),
        "prefill_tok_s": med(new, "prefill_tok_s"),
        "decode_vs_previous": ratio(new, old),
        "prefill_vs_previous": ratio(new, old, "prefill_tok_s"),
        "previous_decode_tok_s": med(old, "decode_tok_s") if old in speed else None,
        "previous_prefill_tok_s": med(old, "prefill_tok_s") if old in speed else None,
        "decode_vs_pytorch": ratio(new, "pytorch"),
        "prefill_vs_pytorch": ratio(new, "pytorch", "prefill_tok_s"),
        "fp32_top1": rows.get("fp32", {}).get("top1_agreement"),
        "fp32_gate_passed": rows.get("fp32", {}).get("gate_passed"),
        "q8da4w_ppl_ratio": q4.get("ppl_ratio"),
        "q8da4w_top1": q4.get("top1_agreement"),
        "q8da4w_kl": q4.get("mean_kl"),
        "q8da4w_gate_passed": q4.get("gate_passed"),
        "q8da4w_attn_ppl_ratio": rows[sr]["ppl_ratio"],
        "q8da4w_attn_top1": rows[sr]["top1_agreement"],
        "q8da4w_attn_kl": rows[sr]["mean_kl"],
        "q8da4w_attn_gate_passed": rows[sr]["gate_passed"],
        "bound_fraction": speed[new]["bound_fraction"],
        "bound_fraction_previous": speed[old]["bound_fraction"] if old in speed else None,
        "bound_fraction_subnet": speed[subnet]["bound_fraction"] if subnet in speed else None,
        "export_seconds": rows[sr]["export_s"],
        "lowering_seconds": rows[sr]["lowering_s"],
        "export_stages": rows[sr]["stages"],
        "previous_export_seconds": baseline["export_s"] if baseline else None,
        "previous_export_stages": baseline["stages"] if baseline else None,
        "export_peak_rss_gb": max(r["export_peak_rss_gb"] for r in rows.values()),
        "recipes": rows,
        "threads": threads,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
