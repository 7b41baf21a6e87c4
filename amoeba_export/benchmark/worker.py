"""Subprocess side of the benchmark: ``python -m amoeba_export.benchmark.worker '<json job>'``.

Runs one measurement in a process that has loaded nothing else, and prints one JSON line. Only
``Backend.load`` and the :class:`Runner` contract are used, so every backend is measured the same way.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gb() -> float:
    from amoeba_export.backends.meta import peak_rss_gb

    return peak_rss_gb()


def run_generation(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from amoeba_export.backends import load_artifact
    from amoeba_export.backends.isolation import FAULT_ENV

    artifact, backend = load_artifact(job["artifact"])
    rss_before = _rss_gb()
    start = time.perf_counter()
    # This worker is the isolation; the parent verified the checksums once (hashing here would count as load time).
    runner = backend.load(artifact, threads=job["threads"], isolated=False, checksums=False)
    load_s = time.perf_counter() - start
    if fault := os.environ.get(FAULT_ENV):  # the crash report's own tests
        os.kill(os.getpid(), signal.Signals[fault])
    # Speed does not depend on which tokens are fed; fixed pseudo-random ids keep every backend on the same input.
    rng = np.random.default_rng(job.get("seed", 0))
    prompt = [int(x) for x in rng.integers(0, runner.vocab_size, job["prompt_tokens"])]
    new_tokens = job["new_tokens"]
    for _ in range(job.get("warmup", 1)):
        runner.generate(prompt[:16], 8)
    start = time.perf_counter()
    first = runner.generate(prompt, 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = runner.generate(prompt, new_tokens)
    total = time.perf_counter() - start
    if len(first) != 1 or len(out) != new_tokens:
        raise RuntimeError(f"runner returned {len(out)} tokens for {new_tokens} requested without stop ids")
    # Prefill + first token cost the same in both calls, so the remaining new_tokens - 1 steps are pure decode.
    decode_s = max(total - ttft, 1e-9)
    runner.close()
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tok_s": job["prompt_tokens"] / ttft,
            "decode_tok_s": (new_tokens - 1) / decode_s, "generate_s": total,
            "rss_before_load_gb": rss_before, "peak_rss_gb": _peak_rss_gb(), "threads": runner.threads,
            "pid": os.getpid()}


def run_bandwidth(job: dict[str, Any]) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) with ``threads`` threads over buffers far beyond cache."""
    import numpy as np

    threads = max(1, job["threads"])
    size = job.get("bytes", 256 << 20)
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, size, threads + 1).astype(int)

    def copy(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])  # releases the GIL

    best = float("inf")
    for _ in range(job.get("repeats", 5)):
        workers = [threading.Thread(target=copy, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return {"copy_bandwidth_gbs": 2 * size / best / 1e9, "buffer_bytes": size, "threads": threads}


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    try:
        result = {"generation": run_generation, "bandwidth": run_bandwidth}[job["mode"]](job)
    except Exception as exc:  # reported as one JSON line: the runtime's stderr chatter is not the cause
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
