"""Does quantization-aware fine-tuning (``amoeba train --qat 8da4w``) make extracted shapes survive 8da4w better?

Issue 16's QAT acceptance. Two elastic fine-tunes of one plan (default: the demo plan of the shipped
SmolLM2-135M, which ``amoeba plan`` / ``amoeba demo`` write; the bench waits for its ``plan.json``) with identical
settings — seed, steps, data, lr, sequence 256, batch 1 — except ``--qat 8da4w`` on the second, both through
``amoeba train --quiet``. From each checkpoint ``amoeba extract`` cuts the full shape and the ≈ 50 %-parameter
shape: the plain run's pick (``--params``: the best of the widest shapes of each depth within half the full
model's parameters, as the demo picks it), then the same depth/width/mode from the QAT run, so both runs are
compared on one shape. Each extracted folder is measured in torchao eager (no lowering; the ``.pte`` matches
eager within 0.01) against its own fp32: fp32 perplexity, then 8da4w's perplexity ratio, mean KL and top-1 on
held-out rows of 256 tokens spread over the split (``amoeba_export.evaluation.recipe_accuracy.measure``, as
bench/executorch_recipe_sweep.py measures recipes).

    python bench/qat_gain.py [--plan DIR] [--steps 20] [--tokens 1024] [--threads 1] [--qat-scales absmax|hqq]
                             [--qat-teacher labels|base]
                             [--work DIR] [--reuse]

``--reuse`` keeps every stage (run, extraction, measurement) whose inputs — the identity of what it reads and
its settings — match what ``stages.json`` in the work folder recorded; without it everything is redone. Prints a
table and ends with one line ``RESULT {json}``: ``qat = {"full": {"plain": r, "qat": r}, "half": {...}}`` holds
the 8da4w perplexity ratios (lower is better; 1 = no loss to quantization).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RECIPE = "8da4w"
SEQ_LEN = 256  # training sequence and held-out row length (the sweep's)
RUNS = ("plain", "qat")
SHAPES = ("full", "half")


def status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Heartbeat:
    """A status line with the elapsed time while a long stage runs (``\\r`` on a terminal, a line a minute else)."""

    def __init__(self, label: str) -> None:
        self.label, self.start, self.done = label, time.perf_counter(), threading.Event()
        self.tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(1.0 if self.tty else 60.0):
            line = f"  {self.label}: {time.perf_counter() - self.start:.0f} s"
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def __enter__(self) -> Heartbeat:
        status(f"{self.label} ...")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        if self.tty:
            print(file=sys.stderr)
        status(f"{self.label}: {'done' if exc[0] is None else 'failed'} in {time.perf_counter() - self.start:.1f} s")


class Stages:
    """``stages.json`` in the work folder: per stage, the key of its inputs, its seconds and its result."""

    def __init__(self, work: Path, reuse: bool) -> None:
        self.path, self.reuse = work / "stages.json", reuse
        self.records = json.loads(self.path.read_text()) if reuse and self.path.is_file() else {}
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def run(self, name: str, key: dict, output: Path | None, fn):
        """``fn()``'s result, or the recorded one when reusing and ``key`` (and ``output``'s presence) match."""
        from amoeba_export.identity import digest

        k = digest(key)
        rec = self.records.get(name)
        if self.reuse and rec and rec["key"] == k and (output is None or (output / "meta.json").is_file()):
            status(f"{name}: reused ({rec['seconds']:.1f} s when run)")
            self.reused.append(name)
        else:
            start = time.perf_counter()
            with Heartbeat(name):
                result = fn()
            rec = {"key": k, "seconds": round(time.perf_counter() - start, 1), "result": result}
            self.records[name] = rec
            self.path.write_text(json.dumps(self.records, indent=1))
        self.seconds[name] = rec["seconds"]
        return rec["result"]


def amoeba(args: list[str], threads: int) -> str:
    """``amoeba ARGS`` in a subprocess on ``threads`` threads; its stdout (stderr passes through)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "amoeba_export.cli", *args], env=env, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"amoeba {' '.join(args)} failed with exit status {proc.returncode}")
    return proc.stdout


def wait_for_plan(plan: Path) -> None:
    if (plan / "plan.json").is_file():
        return
    with Heartbeat(f"waiting for the plan {plan} (amoeba plan --out {plan})"):
        while not (plan / "plan.json").is_file():
            time.sleep(5)


def main() -> int:
    from amoeba_export.finetune.config import QAT_SCALES, QAT_TEACHERS  # torch-free
    from amoeba_export.paths import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, default=cache_dir() / "demo" / "plan",
                    help="plan folder (default: the demo plan of the shipped SmolLM2-135M; waits for its plan.json)")
    ap.add_argument("--steps", type=int, default=20, help="sandwich steps of each fine-tune")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of both (a short run needs a large step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=1024, help=f"held-out tokens (rows of {SEQ_LEN})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qat-scales", choices=QAT_SCALES, default=None,
                    help="int4 scales of the QAT run (amoeba train --qat-scales; default: train's, absmax)")
    ap.add_argument("--qat-teacher", choices=QAT_TEACHERS, default=None,
                    help="what the QAT run's shapes learn from (amoeba train --qat-teacher; default: train's, labels)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: <cache>/bench/qat_gain)")
    ap.add_argument("--reuse", action="store_true", help="keep the stages whose inputs did not change")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from amoeba_export.artifacts import read_meta
    from amoeba_export.data import measurement_rows
    from amoeba_export.evaluation.recipe_accuracy import measure, reference
    from amoeba_export.identity import stage_identity
    from amoeba_export.modelio import load_model, load_tokenizer
    from amoeba_export.paths import cache_subdir
    from amoeba_export.plan import Plan

    started = time.perf_counter()
    work = args.work or cache_subdir("bench", "qat_gain")
    work.mkdir(parents=True, exist_ok=True)
    wait_for_plan(args.plan)
    plan_wait = time.perf_counter() - started
    plan = Plan.load(args.plan)
    stages = Stages(work, args.reuse)

    # -- two fine-tunes, identical but for --qat ----------------------------------------------------------
    common = ["--steps", str(args.steps), "--lr", repr(args.lr), "--seed", str(args.seed), "--seq-len", str(SEQ_LEN),
              "--batch-size", "1", "--save-every", str(args.steps)]
    extra = {"plain": [], "qat": ["--qat", RECIPE] + (["--qat-scales", args.qat_scales] if args.qat_scales else [])
             + (["--qat-teacher", args.qat_teacher] if args.qat_teacher else [])}
    runs = {r: work / f"run-{r}" for r in RUNS}
    train_out = {}
    for r in RUNS:
        cmd = ["train", "--plan", str(args.plan), "--out", str(runs[r]), *common, *extra[r], "--quiet", "--force"]
        out = stages.run(f"train-{r}", {"plan": stage_identity(args.plan), "args": common + extra[r]}, runs[r],
                         lambda cmd=cmd: json.loads(amoeba(cmd, args.threads).strip().splitlines()[-1]))
        train_out[r] = out
        qat = read_meta(runs[r])["train"].get("qat")
        assert qat == (RECIPE if r == "qat" else None), f"run {runs[r]} trained with qat={qat!r}"

    # -- extraction: full shape, then the plain run's ≈50 % pick cut from both ------------------------------
    full_params = plan.params_for(plan.full_shape(), compensate=False)
    budget = int(full_params * 0.5)
    folders = {(s, r): work / f"{s}-{r}" for s in SHAPES for r in RUNS}

    def extract(s: str, r: str, shape_args: list[str]) -> dict:
        key = {"source": stage_identity(runs[r]), "args": shape_args}
        line = stages.run(f"extract-{s}-{r}", key, folders[s, r],
                          lambda: amoeba(["extract", str(runs[r]), "--out", str(folders[s, r]), *shape_args,
                                          "--force"], args.threads).strip())
        status(f"  {line}")
        meta = read_meta(folders[s, r])
        return {"name": meta["shape"]["name"], **{k: meta["shape"]["meta"][k] for k in ("depth", "width", "mode")},
                "params": meta["params"], "shape": {k: v for k, v in meta["shape"].items() if k != "meta"}}

    shapes: dict[str, dict[str, dict]] = {s: {} for s in SHAPES}
    for r in RUNS:
        shapes["full"][r] = extract("full", r, ["--depth", str(plan.dims.num_layers), "--width", "1.0"])
    shapes["half"]["plain"] = extract("half", "plain", ["--params", str(budget)])
    picked = shapes["half"]["plain"]
    shapes["half"]["qat"] = extract("half", "qat", ["--depth", str(picked["depth"]), "--width", repr(picked["width"]),
                                                    "--mode", picked["mode"]])
    for s in SHAPES:
        if shapes[s]["plain"]["shape"] != shapes[s]["qat"]["shape"]:
            raise SystemExit(f"{s}: the runs' extracted shapes differ: {shapes[s]['plain']['name']} vs "
                             f"{shapes[s]['qat']['name']}")

    # -- torchao eager: fp32 and 8da4w of every folder -----------------------------------------------------
    rows = measurement_rows("heldout", load_tokenizer(plan.model_dir), SEQ_LEN, args.tokens).rows

    def measured(folder: Path) -> dict:
        ref = reference(load_model(folder), rows, progress=True)
        return measure(folder, RECIPE, rows, ref=ref, progress=True)

    results = {s: {r: stages.run(f"measure-{s}-{r}", {"folder": stage_identity(folders[s, r]), "recipe": RECIPE,
                                                         "tokens": int(rows.numel()), "seq_len": SEQ_LEN},
                                 None, lambda s=s, r=r: measured(folders[s, r]))
                   for r in RUNS} for s in SHAPES}

    print(f"\n{'shape':<5} {'':<22} {'run':<5} {'params':>12} {'fp32 ppl':>9} {RECIPE + ' ppl':>10} {'ratio':>7} "
          f"{'KL':>7} {'top1':>6}")
    for s in SHAPES:
        for r in RUNS:
            m, sh = results[s][r], shapes[s][r]
            print(f"{s:<5} {sh['name']:<22} {r:<5} {sh['params']:>12,} {m['fp32_ppl']:9.3f} {m['ppl']:10.3f} "
                  f"{m['ppl_ratio']:7.4f} {m['kl']:7.4f} {m['top1']:6.3f}")
    for s in SHAPES:
        p, q = results[s]["plain"], results[s]["qat"]
        print(f"{s}: {RECIPE} ppl ratio {p['ppl_ratio']:.4f} plain -> {q['ppl_ratio']:.4f} qat "
              f"({'better' if q['ppl_ratio'] < p['ppl_ratio'] else 'not better'}); {RECIPE} ppl "
              f"{p['ppl']:.3f} -> {q['ppl']:.3f}")

    def table(key: str) -> dict:
        return {s: {r: round(results[s][r][key], 6) for r in RUNS} for s in SHAPES}

    result = {
        "model": Path(plan.model_dir).name, "plan": str(args.plan), "plan_identity": stage_identity(args.plan),
        "recipe": RECIPE, "qat_scales": args.qat_scales or "absmax",
        "qat_teacher": args.qat_teacher or "labels", "steps": args.steps, "lr": args.lr,
        "seed": args.seed, "seq_len": SEQ_LEN, "batch_size": 1, "tokens": int(rows.numel()),
        "threads": args.threads, "half_budget": budget, "full_params": full_params,
        "shapes": {s: {k: v for k, v in shapes[s]["plain"].items() if k != "shape"} for s in SHAPES},
        "qat": table("ppl_ratio"), "fp32_ppl": table("fp32_ppl"), "quantized_ppl": table("ppl"),
        "kl": table("kl"), "top1": table("top1"),
        "train": {r: {"seconds": train_out[r].get("seconds"), "last_losses": train_out[r].get("last_losses")}
                  for r in RUNS},
        "seconds": {"plan_wait": round(plan_wait, 1), **stages.seconds},
        "reused": stages.reused, "total_seconds": round(time.perf_counter() - started, 1),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
