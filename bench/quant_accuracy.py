"""4-bit accuracy per backend and scheme, round-to-nearest vs calibrated, against the PyTorch source (issue 16).

Every row is one export of the same HF folder (default: the shipped SmolLM2-135M) validated with
``validate_artifact`` against the PyTorch model on held-out rows spread over the split (default 2,048 tokens in
4 rows of 512): file size, perplexity ratio, mean KL(PyTorch ‖ artifact), top-1 agreement.

    python bench/quant_accuracy.py [--model default] [--backends gguf,onnx,executorch] [--tokens 2048]
        [--threads 1] [--reuse]

GGUF rows: Q4_0 and Q4_K_M with ``imatrix=off`` (round-to-nearest: llama.cpp's own scale search, no data) and
``imatrix=on`` (llama.cpp's importance matrix from 16,384 calibration tokens), Q8_0 as the 8-bit reference.
ONNX rows: the shipped ``int4`` (MatMulNBits default RTN, block 32, embedding 4-bit), then blocks of 32 and 128
with the embedding fp32 in each: RTN, HQQ (no data) and GPTQ (Hessians from 2,048 calibration tokens) through
onnxruntime's ``MatMulNBitsQuantizer``. ExecuTorch rows: all-int4 ``8da4w`` and the phone recipe
``8da4w-attn`` with torchao's rounding and with GPTQ (``-gptq``: same grids, codes re-rounded on 4,096
calibration tokens), exported for one token per call (half the lowering; validation steps through each row).
``et_phone_*`` report whichever of these rows is the android-8gb profile's recipe. ``qat`` is measured by
bench/qat_gain.py (two fine-tunes). Ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact
from amoeba_export.errors import AmoebaError
from amoeba_export.evaluation.validate import validate_artifact
from amoeba_export.identity import identity_or_none
from amoeba_export.modelio import resolve_model
from amoeba_export.paths import cache_subdir
from amoeba_export.targets import load_profile

PHONE_PROFILE = "android-8gb"


@dataclass(frozen=True)
class Row:
    backend: str
    scheme: str  # what a user names: the quant type
    method: str  # how the weights were rounded: rtn, imatrix, hqq, gptq, ...
    quant: str  # the backend's quant type
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.scheme}-{self.method}"


ROWS: tuple[Row, ...] = (
    Row("gguf", "Q8_0", "rtn", "Q8_0"),
    Row("gguf", "Q4_K_M", "rtn", "Q4_K_M", {"imatrix": "off"}),
    Row("gguf", "Q4_K_M", "imatrix", "Q4_K_M", {"imatrix": "on"}),
    Row("gguf", "Q4_0", "rtn", "Q4_0", {"imatrix": "off"}),
    Row("gguf", "Q4_0", "imatrix", "Q4_0", {"imatrix": "on"}),
    Row("onnx", "int4", "rtn", "int4"),  # the shipped type: embedding 4-bit too
    # block 32 and 128, embedding fp32 in every row (HQQ/GPTQ cannot quantize the Gather), so rows compare rounding
    Row("onnx", "int4-b32", "rtn", "int4", {"quantize_embedding": False}),
    Row("onnx", "int4-b32", "hqq", "int4-hqq"),
    # HQQ's MatMulNBits carry float zero points, which onnxruntime's CPU kernel runs with fp32 activations even
    # at accuracy_level 4 (int8 activations for uint8 zero points): this row separates the two errors.
    Row("onnx", "int4-b32", "rtn-a0", "int4", {"quantize_embedding": False, "accuracy_level": 0}),
    Row("onnx", "int4-b32", "gptq", "int4-gptq"),
    Row("onnx", "int4-b128", "rtn", "int4-b128", {"quantize_embedding": False}),
    Row("onnx", "int4-b128", "hqq", "int4-hqq-b128"),
    Row("onnx", "int4-b128", "gptq", "int4-gptq-b128"),
    # ExecuTorch: the same grids (HQQ int4 groups of 32, absmax int8 channels), torchao's rounding vs GPTQ's.
    # One token per call (dynamic_shape=false): half the lowering, same weights and kernels; validation steps.
    Row("executorch", "8da4w", "rtn", "8da4w", {"dynamic_shape": False}),
    Row("executorch", "8da4w", "gptq", "8da4w-gptq", {"dynamic_shape": False}),
    Row("executorch", "8da4w-attn", "rtn", "8da4w-attn", {"dynamic_shape": False}),
    Row("executorch", "8da4w-attn", "gptq", "8da4w-attn-gptq", {"dynamic_shape": False}),
)

# RESULT key -> the row whose ppl ratio it reports (backend, scheme, method).
RESULT_ROWS: dict[str, tuple[str, str, str]] = {
    "gguf_q4km_ppl_ratio": ("gguf", "Q4_K_M", "imatrix"),
    "gguf_q4km_rtn_ppl_ratio": ("gguf", "Q4_K_M", "rtn"),
    "gguf_q40_ppl_ratio": ("gguf", "Q4_0", "imatrix"),
    "gguf_q40_rtn_ppl_ratio": ("gguf", "Q4_0", "rtn"),
    "onnx_int4_ppl_ratio": ("onnx", "int4", "rtn"),
    "onnx_int4_hqq_ppl_ratio": ("onnx", "int4-b32", "hqq"),
    "onnx_int4_gptq_ppl_ratio": ("onnx", "int4-b32", "gptq"),
    "onnx_int4_gptq_b128_ppl_ratio": ("onnx", "int4-b128", "gptq"),
    "et_8da4w_ppl_ratio": ("executorch", "8da4w", "gptq"),
    "et_8da4w_rtn_ppl_ratio": ("executorch", "8da4w", "rtn"),
}
# Keys of the issue that no row of this bench can fill, and why.
NOT_BUILT: dict[str, str] = {
    "qat": "measured by bench/qat_gain.py (two fine-tunes of the same step budget)",
}


def export_row(row: Row, hf_dir: Path, out: Path, *, reuse: bool, fp32_onnx: Path | None, threads: int
               ) -> tuple[Artifact, float]:
    if reuse and (out / "meta.json").is_file():
        art = Artifact.open(out)
        if art.meta.get("source_identity") == identity_or_none(hf_dir):
            return art, float(art.meta.get("export_seconds", 0.0))
    options = dict(row.options)
    if row.backend == "gguf":  # the GGUF quantizer's own options (the other backends take neither)
        options.update(threads=threads, progress=False)
    if row.backend == "onnx" and fp32_onnx is not None:
        options["fp32_onnx"] = fp32_onnx
    start = time.perf_counter()
    art = get_backend(row.backend).export(hf_dir, out, row.quant, force=True, **options)
    return art, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="HF folder or 'default' (SmolLM2-135M)")
    ap.add_argument("--backends", default="gguf,onnx,executorch", help="comma-separated: gguf, onnx, executorch")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens validated (spread over the split)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already exported from this model")
    ap.add_argument("--rows", help="comma-separated row names to run (e.g. onnx-int4-b32-rtn-a0); default: all")
    ap.add_argument("--out", default=None, help="artifact folder (default: the cache's bench/quant_accuracy)")
    args = ap.parse_args(argv)

    hf_dir = resolve_model(args.model)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {r.backend for r in ROWS})
    if unknown:
        print(f"error: unknown backend(s) {', '.join(unknown)} (this bench has rows for gguf, onnx, executorch)",
              file=sys.stderr)
        return 2
    root = Path(args.out) if args.out else cache_subdir("bench", "quant_accuracy", hf_dir.name)
    fp32_onnx = None
    if "onnx" in backends:
        # One fp32 graph, quantized by every ONNX row (the export is the slow part).
        fp32, _ = export_row(Row("onnx", "fp32", "none", "fp32"), hf_dir, root / "onnx-fp32", reuse=args.reuse,
                             fp32_onnx=None, threads=args.threads)
        fp32_onnx = fp32.path
    results: list[dict] = []
    header = (f"{'backend':<8}{'scheme':<9}{'method':<9}{'MB':>8}{'ppl ratio':>11}{'mean KL':>10}{'top-1':>8}"
              f"{'export s':>10}")
    print(f"{hf_dir.name}: validation on {args.tokens:,} held-out tokens in rows of {args.seq_len}", flush=True)
    print(header, flush=True)
    wanted = set(args.rows.split(",")) if args.rows else None
    for row in (r for r in ROWS if r.backend in backends and (wanted is None or r.name in wanted)):
        try:
            art, seconds = export_row(row, hf_dir, root / row.name, reuse=args.reuse, fp32_onnx=fp32_onnx,
                                      threads=args.threads)
        except AmoebaError as exc:  # one type that cannot export this model is a row, not the end of the run
            results.append({"backend": row.backend, "scheme": row.scheme, "method": row.method, "quant": row.quant,
                            "error": str(exc)})
            print(f"{row.backend:<8}{row.scheme:<9}{row.method:<9}  error: {exc}", flush=True)
            continue
        report = validate_artifact(art.path, hf_dir, max_tokens=args.tokens, seq_len=args.seq_len,
                                   raise_on_fail=False, threads=args.threads, progress=False)
        m = report.metrics
        entry = {"backend": row.backend, "scheme": row.scheme, "method": row.method, "quant": row.quant,
                 "label": report.quant_label, "mb": round(art.meta["model_bytes"] / 1e6, 3),
                 "ppl_ratio": round(m["ppl_ratio"], 4), "mean_kl": round(m["mean_kl"], 5),
                 "top1": round(m["top1_agreement"], 4), "ref_ppl": round(m["ref_ppl"], 4),
                 "gate": report.gate, "gate_passed": report.passed, "export_seconds": round(seconds, 1),
                 "calibration": art.meta.get("calibration")}
        results.append(entry)
        print(f"{row.backend:<8}{row.scheme:<9}{row.method:<9}{entry['mb']:>8.1f}{entry['ppl_ratio']:>11.4f}"
              f"{entry['mean_kl']:>10.4f}{entry['top1']:>8.3f}{entry['export_seconds']:>10.1f}", flush=True)
    found = {(e["backend"], e["scheme"], e["method"]): e for e in results if "error" not in e}
    out: dict = {}
    reasons: dict[str, str] = dict(NOT_BUILT)
    for key, where in RESULT_ROWS.items():
        if where in found:
            out[key] = found[where]["ppl_ratio"]
        else:
            out[key] = None
            reasons[key] = f"not run (--backends {args.backends})"
    out.update(dict.fromkeys(NOT_BUILT))
    # The phone profile's default recipe, as shipped (targets/android-8gb.toml), read from its row.
    phone = load_profile(PHONE_PROFILE).quant
    phone_row = next((e for e in found.values() if e["backend"] == "executorch" and e["quant"] == phone), None)
    out["et_phone_recipe"] = phone
    out["et_phone_ppl_ratio"] = phone_row and phone_row["ppl_ratio"]
    out["et_phone_mb"] = phone_row and phone_row["mb"]
    if phone_row is None:
        reasons["et_phone_ppl_ratio"] = reasons["et_phone_mb"] = f"no row exports {phone!r} in this run"
    print("RESULT " + json.dumps({**out, "reasons": reasons, "model": hf_dir.name, "tokens": args.tokens,
                                  "seq_len": args.seq_len, "rows": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
