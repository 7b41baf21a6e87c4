"""ONNX on the default model: size, speed and accuracy of every quant type, and a ≈50 % per-layer subnet.

One run exports (or reuses, with --reuse) the fp32 graph once, quantizes it into each requested type,
validates every artifact against its PyTorch reference with the gates of gates.json, and benchmarks each
one beside PyTorch eager in fresh processes. Prints a table, then exactly one ``RESULT {json}`` line;
exits non-zero when a gate fails (a failing quantization is an error, never a warning).

    python bench/onnx_speed.py                         # default model: int8, int8-dynamic, int4
    python bench/onnx_speed.py --quants int8,int8-dynamic,int4,int4-b128,int4-hqq
    python bench/onnx_speed.py --subnet path/to/extracted  # a subnet from `amoeba extract` instead of a slice
    python bench/onnx_speed.py --quants int8-dynamic --quant-option int8-dynamic:per_channel=true  # must fail
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact
from amoeba_export.benchmark import bench_artifact
from amoeba_export.benchmark.harness import measure_bandwidth
from amoeba_export.errors import AmoebaError
from amoeba_export.evaluation.validate import validate_artifact
from amoeba_export.modelio import resolve_model
from amoeba_export.paths import cache_subdir

SUBNET_FRACTION = 0.5
SUBNET_DEPTH_FRACTION = 2 / 3


def sliced_subnet(hf_dir: Path, out: Path, fraction: float = SUBNET_FRACTION) -> Path:
    """A per-layer-width subnet of ≈``fraction`` of the parameters, written by the extractor's own writer.

    Without a trained plan the channels kept are simply the first ones; speed and the fp32 gate (which
    compares the ONNX graph with this very folder) do not depend on which channels are kept.
    """
    from amoeba_export.elastic import make_elastic
    from amoeba_export.extract import write_subnet
    from amoeba_export.modelio import load_model
    from amoeba_export.shape import ModelDims, Shape

    if (out / "meta.json").is_file():
        return out
    model = load_model(hf_dir)
    dims = ModelDims.from_config(model.config)
    depth = max(1, round(dims.num_layers * SUBNET_DEPTH_FRACTION))
    layers = tuple(sorted({round(i * (dims.num_layers - 1) / max(1, depth - 1)) for i in range(depth)}))
    # Alternate wide and narrow layers so the widths really differ per layer.
    q = tuple(dims.num_heads if i % 2 else max(dims.num_kv_heads, dims.num_heads // 2 // dims.num_kv_heads
                                                 * dims.num_kv_heads) for i in range(len(layers)))
    target = fraction * Shape.full(dims).num_params(dims)
    lo, hi = 1, dims.intermediate_size
    while lo < hi:  # largest base MLP width that stays under the target
        mid = (lo + hi + 1) // 2
        mlp = tuple(max(1, min(dims.intermediate_size, mid + (mid // 3) * (1 if i % 2 else -1)))
                    for i in range(len(layers)))
        ok = Shape(layers, q, (dims.num_kv_heads,) * len(layers), mlp).num_params(dims) <= target
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    mlp = tuple(max(1, min(dims.intermediate_size, lo + (lo // 3) * (1 if i % 2 else -1))) for i in range(len(layers)))
    shape = Shape(layers, q, (dims.num_kv_heads,) * len(layers), mlp, name=f"slice{int(fraction * 100)}")
    return write_subnet(make_elastic(model), shape, out, source_dir=hf_dir, force=True)


def export_once(backend, hf_dir: Path, out: Path, quant: str, reuse: bool, **options) -> Artifact:
    """Export, or with ``reuse`` take the artifact a previous run wrote from the same folder and recipe."""
    if reuse and (out / "meta.json").is_file():
        art = Artifact.open(out)
        same_source = art.meta["source"]["hf_dir"] == str(hf_dir.resolve())
        recipe = art.meta.get("recipe")
        if backend.name == "onnx":
            from amoeba_export.backends.onnx.quantize import QuantRecipe, recipe_for

            wanted = recipe_for(quant, {k: v for k, v in options.items() if k not in ("fp32_onnx", "external_data")})
            # Fields added to the recipe since that artifact was written count at their defaults.
            same_recipe = {**QuantRecipe().to_dict(), **(recipe or {})} == wanted.to_dict()
        else:
            same_recipe = True
        if same_source and same_recipe:
            return art
    return backend.export(hf_dir, out, quant, force=True, **options)


def parse_options(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        quant, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(quant, {})[key] = json.loads(value) if value[:1] in "[{0123456789tfn" else value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--subnet", default=None, help="an extracted ≈50%% subnet folder (default: slice one)")
    ap.add_argument("--quants", default="int8,int8-dynamic,int4")
    ap.add_argument("--quant-option", action="append", default=[], metavar="QUANT:KEY=VALUE")
    ap.add_argument("--work", default=None, help="folder for the artifacts (default: the cache)")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts a previous run wrote")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=2048, help="validation tokens per artifact")
    args = ap.parse_args(argv)

    hf_dir = resolve_model(args.model)
    work = Path(args.work) if args.work else cache_subdir("bench") / "onnx_speed"
    work.mkdir(parents=True, exist_ok=True)
    onnx, pytorch = get_backend("onnx"), get_backend("pytorch")
    quants = [onnx.check_quant(q) for q in args.quants.split(",") if q]
    options = parse_options(args.quant_option)
    t0 = time.perf_counter()

    subnet_dir = Path(args.subnet) if args.subnet else sliced_subnet(hf_dir, work / "subnet_hf")
    arts: dict[str, Artifact] = {"pytorch": export_once(pytorch, hf_dir, work / "pytorch", "F32", args.reuse)}
    arts["onnx_fp32"] = export_once(onnx, hf_dir, work / "onnx_fp32", "fp32", args.reuse)
    for q in quants:
        opts = dict(options.get(q, {}))
        arts[f"onnx_{q}"] = export_once(onnx, hf_dir, work / f"onnx_{q}", q, args.reuse,
                                        fp32_onnx=arts["onnx_fp32"].path, **opts)
    arts["subnet_onnx_fp32"] = export_once(onnx, subnet_dir, work / "subnet_onnx_fp32", "fp32", args.reuse)

    validation, failed = {}, []
    for name, art in arts.items():
        if name == "pytorch":
            continue
        ref = subnet_dir if name.startswith("subnet") else hf_dir
        report = validate_artifact(art.path, ref, max_tokens=args.max_tokens, raise_on_fail=False)
        print(report.table(), flush=True)
        validation[name] = report
        if not report.passed:
            failed.append(f"{name}: " + "; ".join(c.describe() for c in report.failures))

    bandwidth = measure_bandwidth(args.threads or _threads())
    bench = {name: bench_artifact(art.path, threads=args.threads, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, repeats=args.repeats, bandwidth=bandwidth)
             for name, art in arts.items()}

    def med(name: str, metric: str) -> float:
        return bench[name]["metrics"][metric]["median"]

    fp32_decode = med("onnx_fp32", "decode_tok_s")
    header = (f"{'artifact':<20}{'MB':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'× fp32':>8}{'bound frac':>11}"
              f"{'ppl ratio':>11}{'top-1':>8}{'KL':>9}{'gate':>6}")
    print(f"\ncopy bandwidth {bandwidth['copy_bandwidth_gbs']:.2f} GB/s, {bench['onnx_fp32']['threads']} threads, "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, median of {args.repeats} fresh processes")
    print(header)
    for name, art in arts.items():
        v = validation.get(name)
        acc = (f"{v.metrics['ppl_ratio']:>11.4f}{v.metrics['top1_agreement']:>8.3f}{v.metrics['mean_kl']:>9.4f}"
               f"{'ok' if v.passed else 'FAIL':>6}") if v else f"{'(reference)':>34}"
        print(f"{name:<20}{art.size_bytes / 1e6:>8.1f}{med(name, 'prefill_tok_s'):>15.1f}"
              f"{med(name, 'decode_tok_s'):>14.2f}{med(name, 'decode_tok_s') / fp32_decode:>8.2f}"
              f"{bench[name]['bound_fraction']:>11.3f}" + acc)
    speedup = med("subnet_onnx_fp32", "decode_tok_s") / fp32_decode
    params = arts["subnet_onnx_fp32"].meta["shape"]["params"] / arts["onnx_fp32"].meta["shape"]["params"]
    print(f"≈50 % subnet: {params:.3f} of the parameters, decode ×{speedup:.2f} vs the full fp32 ONNX model "
          f"({'≥' if speedup >= 1.6 else '<'} 1.6)")
    for msg in failed:
        print(f"GATE FAILED {msg}", file=sys.stderr)

    result = {
        "speedup_50pct": round(speedup, 4),
        "subnet_param_fraction": round(params, 4),
        "fp32_top1": validation["onnx_fp32"].metrics["top1_agreement"],
        "bound_fraction": round(bench[f"onnx_{quants[-1]}" if quants else "onnx_fp32"]["bound_fraction"], 4),
        "bound_fraction_of": f"onnx_{quants[-1]}" if quants else "onnx_fp32",
        "bound_fractions": {n: round(b["bound_fraction"], 4) for n, b in bench.items()},
        "decode_tok_s": {n: round(med(n, "decode_tok_s"), 2) for n in bench},
        "prefill_tok_s": {n: round(med(n, "prefill_tok_s"), 1) for n in bench},
        "decode_vs_pytorch": {n: round(med(n, "decode_tok_s") / med("pytorch", "decode_tok_s"), 3) for n in bench},
        "model_mb": {n: round(a.size_bytes / 1e6, 1) for n, a in arts.items()},
        "export_seconds": {n: a.meta.get("export_seconds") for n, a in arts.items()},
        "copy_bandwidth_gbs": bandwidth["copy_bandwidth_gbs"],
        "threads": bench["onnx_fp32"]["threads"],
        "failed_gates": failed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for name, v in validation.items():
        result[f"{name.removeprefix('onnx_')}_ppl_ratio"] = round(v.metrics["ppl_ratio"], 4)
        result[f"{name.removeprefix('onnx_')}_top1"] = round(v.metrics["top1_agreement"], 4)
        result[f"{name.removeprefix('onnx_')}_kl"] = round(v.metrics["mean_kl"], 5)
    print("RESULT " + json.dumps(result))
    return 1 if failed else 0


def _threads() -> int:
    from amoeba_export.benchmark.harness import default_threads

    return default_threads()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AmoebaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
