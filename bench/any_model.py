"""Issue 14: any Llama-family checkpoint a user brings, end to end. A tiny random model of every family
(Llama with llama3 RoPE scaling, tied Llama, Mistral, Qwen2, Qwen3 with q/k norm) through plan → a 2-step elastic
fine-tune and an extraction from its checkpoint → extract (uniform and per-layer) → GGUF F16 and Q8_0, ONNX fp32,
ExecuTorch fp32 → validate.

Each stage's outcome is ``ok``, ``unsupported: …`` (a limit of the target runtime that the architecture table
names: llama.cpp has no graph for per-layer or compensated Qwen3 subnets), ``error: …`` or ``skipped: …``.
Offline and tiny (seconds per stage, except ExecuTorch's lowering: ≈ 20-45 s per subnet on a busy 2-core machine).

    python bench/any_model.py [--families qwen2,qwen3] [--exports gguf:F16,onnx:fp32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from amoeba_export.chain import EXPORTS, run_chain
from amoeba_export.paths import cache_subdir
from amoeba_export.testing import FAMILIES, TEXT, tiny_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--exports", default=",".join(f"{b}:{q}" for b, q in EXPORTS),
                    help="comma-separated backend:quant pairs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (validation runtimes use 1)")
    ap.add_argument("--train-steps", type=int, default=2,
                    help="elastic fine-tune steps before extracting from the checkpoint (0: no train stage)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; supported are: {', '.join(FAMILIES)}")
    exports = [tuple(pair.split(":", 1)) for pair in args.exports.split(",") if pair]
    work = Path(tempfile.mkdtemp(prefix="any-model-", dir=cache_subdir("bench")))
    (work / "text.txt").write_text(TEXT)
    stages: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for family in families:
        started = time.perf_counter()
        model_dir = work / family / "model"
        tiny_family(family, model_dir)
        result = run_chain(model_dir, work / family, exports=exports, text_file=work / "text.txt",
                           train_steps=args.train_steps)
        stages[family], seconds[family] = result.stages, round(time.perf_counter() - started, 1)
        print(f"\n{family} ({seconds[family]} s)")
        for stage, outcome in result.stages.items():
            print(f"  {stage:<38}{outcome[:150]}  ({result.seconds.get(stage, 0):.1f} s)")
    failed = {f: [s for s, v in st.items() if v.startswith(("error", "skipped"))] for f, st in stages.items()}
    print("RESULT " + json.dumps({
        "all_ok": not any(failed.values()),
        "failed": {f: s for f, s in failed.items() if s},
        "stages": stages,
        "seconds": seconds,
        "work_dir": str(work),
    }))


if __name__ == "__main__":
    main()
