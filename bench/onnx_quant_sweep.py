"""Which ONNX quantization settings keep the default model accurate: a sweep over recipes.

Each candidate quantizes one fp32 ONNX export (an fp32 artifact of `amoeba export --backend onnx`) and is
scored against that fp32 graph on held-out text: perplexity ratio, top-1 agreement, mean KL, file size.
The fp32 graph equals PyTorch to ~1e-4 (its gate checks that), so this isolates the quantization error.

    python bench/onnx_quant_sweep.py FP32_ARTIFACT [--only int8_default,int4] [--rows 4 --seq-len 256]

Ends with one ``RESULT {json}`` line (candidate -> metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact

# Name -> (quant type, recipe overrides). The shipped types come first, then the settings they beat.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "int8": ("int8", {}),
    "int8-dynamic": ("int8-dynamic", {}),
    "int4": ("int4", {}),
    "int8_dynamic_default": ("int8-dynamic", {"exclude": ()}),
    "int8_dynamic_no_lm_head": ("int8-dynamic", {"exclude": ("lm_head",)}),
    "int8_dynamic_no_down_proj": ("int8-dynamic", {"exclude": ("down_proj",)}),
    "int8_dynamic_reduce_range": ("int8-dynamic", {"exclude": (), "reduce_range": True}),
    "int8_dynamic_per_channel": ("int8-dynamic", {"exclude": (), "per_channel": True}),
    "int4_all_4bit": ("int4", {"keep_8bit": ()}),
    "int4_lm_head_8bit": ("int4", {"keep_8bit": ("lm_head",)}),
    "int4_embedding_fp32": ("int4", {"quantize_embedding": False}),
    "int4_symmetric": ("int4", {"symmetric": True}),
    "int4-b128": ("int4-b128", {}),
    "int4-hqq": ("int4-hqq", {}),
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def score(logits: list[np.ndarray], ref: list[np.ndarray], rows: np.ndarray) -> dict[str, float]:
    nll = np.mean([-_log_softmax(lg[:-1])[np.arange(len(r) - 1), r[1:]].mean() for lg, r in zip(logits, rows)])
    top1 = np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, ref)])
    kl = np.mean([(np.exp(_log_softmax(b)) * (_log_softmax(b) - _log_softmax(a))).sum(-1).mean()
                  for a, b in zip(logits, ref)])
    return {"ppl": float(np.exp(nll)), "top1": float(top1), "kl": float(kl)}


def main(argv: list[str] | None = None) -> int:
    from amoeba_export.data import split_tokens
    from amoeba_export.modelio import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_artifact")
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    backend = get_backend("onnx")
    fp32 = Artifact.open(args.fp32_artifact)
    hf_dir = Path(fp32.meta["source"]["hf_dir"])
    rows = split_tokens("heldout", load_tokenizer(fp32.path))[: args.rows * args.seq_len]
    rows = rows.reshape(args.rows, args.seq_len).numpy()

    def logits_of(art: Artifact) -> list[np.ndarray]:
        with backend.load(art, threads=args.threads) as runner:
            return [runner.logits(r.tolist()) for r in rows]

    ref = logits_of(fp32)
    ref_ppl = score(ref, ref, rows)["ppl"]
    print(f"fp32 ONNX: perplexity {ref_ppl:.3f} on {rows.size} held-out tokens, {fp32.size_bytes / 1e6:.1f} MB")
    names = args.only.split(",") if args.only else list(CANDIDATES)
    results = {}
    with tempfile.TemporaryDirectory(dir=fp32.path.parent) as tmp:
        for name in names:
            quant, overrides = CANDIDATES[name]
            start = time.perf_counter()
            art = backend.export(hf_dir, Path(tmp) / name, quant, fp32_onnx=fp32.path, **overrides)
            seconds = time.perf_counter() - start
            m = score(logits_of(art), ref, rows)
            results[name] = {"mb": round(art.size_bytes / 1e6, 1), "ppl_ratio": round(m["ppl"] / ref_ppl, 4),
                             "top1": round(m["top1"], 4), "kl": round(m["kl"], 4), "quantize_s": round(seconds, 1)}
            print(f"{name:<28}{json.dumps(results[name])}", flush=True)
            shutil.rmtree(art.path)
    print("RESULT " + json.dumps({"fp32_ppl": round(ref_ppl, 4), "tokens": int(rows.size), "candidates": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
