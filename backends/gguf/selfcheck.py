"""Does llama.cpp, as built on this machine, decode quantized GGUF files? Checked once per build and CPU.

A llama.cpp built for another CPU, or with a fast path that is broken on this one (its AMX weight repacking
on Xeons), loads F32/F16 files fine and dies by SIGSEGV on the first quantized matmul. So this writes a tiny
model whose rows fit every block size (hidden 256: Q8_0 and Q4_K are really used, no fallback), exports
it to Q8_0 and Q4_K_M with our own backend, and decodes both in a child process (the isolated runner):
finite logits of the right shape, and greedy generation that agrees with the full-sequence logits.

The verdict is cached per (llama.cpp library files, CPU model) in the cache's ``runtime-checks`` folder, so
the check costs seconds once; every GGUF load, export and the install (``make setup``) run it.

    python -m amoeba_export.backends.gguf.selfcheck [--force]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from amoeba_export.benchmark.harness import cpu_name
from amoeba_export.errors import AmoebaError, BackendError

CHECK_VERSION = 1
QUANTS = ("Q8_0", "Q4_K_M")
PROMPT = [3, 17, 42, 99, 150, 7, 260, 31, 5, 77, 300, 12]
NEW_TOKENS = 8


def library_fingerprint() -> str:
    """Hash of the llama.cpp shared libraries' names, sizes and mtimes, and of the CPU's model name."""
    import importlib.util
    import platform

    spec = importlib.util.find_spec("llama_cpp")
    root = Path(spec.origin).parent if spec and spec.origin else None
    parts = [platform.machine(), cpu_name()]
    if root is not None:
        for lib in sorted(root.rglob("*.so*")) + sorted(root.rglob("*.dylib")):
            st = lib.stat()
            parts.append(f"{lib.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    from amoeba_export.paths import cache_subdir

    return cache_subdir("runtime-checks") / f"llama_cpp-v{CHECK_VERSION}-{library_fingerprint()}.json"


def _tiny_model(out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from amoeba_export.testing import tiny_llama

    tiny_llama(out, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
    # Unit-gain projections: random weights of std 0.15 would amplify quantization error layer by layer.
    weights = load_file(str(out / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            weights[name] = w / (0.15 * w.shape[1] ** 0.5)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_check() -> dict:
    """Export and decode the tiny model in every quant type; raises RuntimeCrashError / BackendError."""
    from amoeba_export.backends import get_backend

    gguf = get_backend("gguf")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="amoeba-llama-check-") as tmp:
        hf_dir = _tiny_model(Path(tmp) / "hf")
        for quant in QUANTS:
            # No importance matrix: it changes no kernel, and the check must not read the corpora (install, first load)
            artifact = gguf.export(hf_dir, Path(tmp) / quant, quant, progress=False, imatrix="off")
            with gguf.load(artifact, threads=2, n_ctx=64, selfcheck=False) as runner:
                new = runner.generate(PROMPT, NEW_TOKENS)
                logits = runner.logits(PROMPT + new[:-1])
            expected = logits[len(PROMPT) - 1:].argmax(-1)
            problems = []
            if logits.shape != (len(PROMPT) + NEW_TOKENS - 1, runner.vocab_size):
                problems.append(f"logits of shape {logits.shape}")
            if not np.isfinite(logits).all():
                problems.append("non-finite logits")
            if len(new) != NEW_TOKENS or float(np.mean(expected == np.asarray(new))) < 1.0:
                problems.append("cached greedy decode disagrees with the full-sequence logits")
            if problems:
                raise BackendError(f"llama.cpp decodes {quant} wrongly on this machine: {'; '.join(problems)}",
                                   fix=gguf.crash_fix)
            results[quant] = {"types": artifact.meta["gguf"]["tensor_types"], "tokens": new}
    return {"version": CHECK_VERSION, "fingerprint": library_fingerprint(), "cpu": cpu_name(),
            "quants": results, "seconds": round(time.perf_counter() - started, 2)}


def ensure_llama_cpp_works(*, force: bool = False, for_file: Path | None = None) -> dict:
    """The cached verdict for this build and CPU, checking first when there is none (or ``force``).

    ``for_file``: the GGUF file the caller is about to run, named in the error when the check fails."""
    cache = _cache_file()
    if not force and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass  # a torn cache file: check again
    try:
        result = run_check()  # a failure raises and caches nothing, so a rebuilt library is checked afresh
    except AmoebaError as exc:
        if for_file is None:
            raise
        message = str(exc).removesuffix(f" ({exc.fix})") if exc.fix else str(exc)
        raise type(exc)(f"{for_file} not run: this machine's self-check of llama.cpp failed — {message}",
                        fix=exc.fix) from exc
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(cache)
    return result


def main(argv: list[str]) -> int:
    force = "--force" in argv
    try:
        result = ensure_llama_cpp_works(force=force)
    except AmoebaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"llama.cpp decodes {', '.join(result['quants'])} on this machine ({result['cpu']}; "
          f"checked in {result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
