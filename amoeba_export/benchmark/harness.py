"""Benchmark an artifact: load time, TTFT, prefill and decode speed, peak RSS, and the bandwidth bound.

Every repeat runs in a fresh subprocess (``worker.py``), so caches, allocator state and imported runtimes
never carry over between measurements or backends. Decode speed is also given as a fraction of the
memory-bandwidth bound: ``bytes read per token ÷ copy bandwidth`` is the least time a token can take
when decode is memory-bound, so ``measured tok/s ÷ (bandwidth ÷ bytes per token)`` says how close the
runtime gets (bandwidth counts bytes read + written, STREAM-copy style).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from amoeba_export.backends.base import Artifact
from amoeba_export.benchmark import load as machine_load
from amoeba_export.errors import BackendError, RuntimeCrashError

BENCH_VERSION = 1
METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_gb", "rss_before_load_gb")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    if job.get("runtime_path"):  # another build of the runtime, found before the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [job["runtime_path"], env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "amoeba_export.benchmark.worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"benchmark {job['mode']} run exceeded {timeout:.0f} s",
                           fix="use fewer tokens or a smaller model") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode < 0:  # killed by a signal: a native crash of the runtime, not a Python error
        raise _crash(job, proc.returncode)
    reply = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not lines or "error" in reply:
        cause = (f"{reply['error']}: {reply['message']}" if "error" in reply
                 else (proc.stderr.strip().splitlines() or ["no output"])[-1])
        raise BackendError(f"benchmark {job['mode']} run failed (exit {proc.returncode}): {cause}",
                           fix="check that the artifact loads: amoeba validate ARTIFACT --reference HF_DIR")
    return reply


def _crash(job: dict[str, Any], returncode: int) -> RuntimeCrashError:
    from amoeba_export.backends import get_backend
    from amoeba_export.backends.isolation import crash_error, signal_name

    if "artifact" not in job:
        return RuntimeCrashError(f"benchmark {job['mode']} run crashed ({signal_name(returncode)})",
                                 fix="report this machine's CPU")
    artifact = Artifact.open(job["artifact"])
    backend = get_backend(artifact.backend)
    return crash_error(artifact, returncode, backend.runtime or backend.name, backend.crash_fix)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and spread of one metric over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / statistics.median(values) if statistics.median(values) else 0.0,
            "values": values}


def measure_bandwidth(threads: int, *, timeout: float = 120.0) -> dict[str, Any]:
    return _run_worker({"mode": "bandwidth", "threads": threads}, timeout)


def bench_artifact(artifact_dir: str | Path, *, threads: int | None = None, prompt_tokens: int = 128,
                   new_tokens: int = 128, repeats: int = 3, warmup: int = 1, bandwidth: dict[str, Any] | None = None,
                   timeout: float = 900.0, progress: bool = True, runtime_path: str | Path | None = None,
                   retries: int = 1) -> dict[str, Any]:
    """Measure ``artifact_dir`` ``repeats`` times, each in a fresh subprocess; returns a JSON-ready dict.

    ``bandwidth`` (from :func:`measure_bandwidth`) may be passed to share one measurement across artifacts.
    ``runtime_path``: a folder holding another build of the runtime's package (``pip install --target``),
    imported instead of the installed one — to compare builds side by side.
    ``retries``: a repeat during which other processes kept the machine busy is run again (at most this many
    times in all); the result says whether the figures can be trusted (``trust``, see benchmark/load.py).
    """
    if repeats < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise BackendError("benchmark needs repeats ≥ 1, prompt_tokens ≥ 1 and new_tokens ≥ 2",
                           fix="pass larger values")
    artifact = Artifact.open(artifact_dir)
    artifact.verify(checksums=True)  # once here; each worker checks sizes only
    threads = threads or default_threads()
    job = {"mode": "generation", "artifact": str(artifact.path), "threads": threads,
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "warmup": warmup,
           "runtime_path": str(runtime_path) if runtime_path else None}
    runs, loads, retried = [], [], 0
    for _ in tqdm(range(repeats), desc=f"bench {artifact.path.name}", unit="run", disable=not progress):
        while True:
            before = machine_load.sample()
            run = _run_worker(job, timeout)
            load = machine_load.between(before, machine_load.sample())
            busy = load is not None and load["other_cpu"] > machine_load.MAX_OTHER_CPU
            if not busy or retried >= retries:
                break
            retried += 1
        runs.append(run)
        loads.append(load)
    bandwidth = bandwidth or measure_bandwidth(threads)
    metrics = {name: summarize([r[name] for r in runs]) for name in METRICS}
    bytes_per_token = int(artifact.meta.get("bytes_per_token") or artifact.size_bytes)
    bound = bandwidth["copy_bandwidth_gbs"] * 1e9 / bytes_per_token
    return {
        "kind": "bench",
        "version": BENCH_VERSION,
        "artifact": str(artifact.path),
        "backend": artifact.backend,
        "quant": artifact.quant,
        "quant_label": str(artifact.meta.get("quant_label") or artifact.quant),
        "model_bytes": artifact.size_bytes,
        "bytes_per_token": bytes_per_token,
        "threads": threads,
        "runner_threads": runs[0].get("threads"),
        "runtime_path": job["runtime_path"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    **bandwidth},
        "metrics": metrics,
        "pids": [r["pid"] for r in runs],
        "bandwidth_bound_tok_s": bound,
        "bound_fraction": metrics["decode_tok_s"]["median"] / bound,
        "load": loads,
        "retried": retried,
        "trust": machine_load.judge(loads, metrics["decode_tok_s"]["spread"]),
    }


def cpu_name() -> str:
    """This machine's CPU model name (x86 "model name", arm64 "Model")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    rows = [("file size", f"{result['model_bytes'] / 1e6:.1f} MB"),
            ("threads", str(result["threads"]))]
    for name, unit, scale in (("load_s", "s", 1), ("ttft_s", "ms", 1e3), ("prefill_tok_s", "tok/s", 1),
                              ("decode_tok_s", "tok/s", 1), ("peak_rss_gb", "GiB", 1)):
        s = m[name]
        lo, hi = s["min"] * scale, s["max"] * scale
        rows.append((name, f"{s['median'] * scale:.4g} {unit}  (min {lo:.4g}, max {hi:.4g})"))
    rows += [("copy bandwidth", f"{result['machine']['copy_bandwidth_gbs']:.2f} GB/s"),
             ("bandwidth bound", f"{result['bandwidth_bound_tok_s']:.1f} tok/s "
                                 f"({result['bytes_per_token'] / 1e6:.1f} MB read per token)"),
             ("bound fraction", f"{result['bound_fraction']:.3f}")]
    label = result.get("quant_label") or result["quant"]
    head = (f"bench {result['artifact']} ({result['backend']}/{label}), prompt {result['prompt_tokens']}, "
            f"{result['new_tokens']} new tokens, median of {result['repeats']} fresh processes")
    trust = result.get("trust") or {}
    if trust.get("why"):
        rows.append(("UNRELIABLE", "; ".join(trust["why"]) + " (rerun on an idle machine)"))
    return "\n".join([head, *(f"  {k:<16}{v}" for k, v in rows)])
