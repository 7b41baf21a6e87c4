"""llama.cpp's ``llama-quantize`` and ``llama-imatrix``, built from the sources the installed runtime came from.

Exports do not need them: llama-cpp-python 0.3.36 passes an importance matrix to ``llama_model_quantize`` as
the C array ``llama_model_imatrix_data`` (see :mod:`.quantize`), so quantization stays in the runtime that
decodes. The tools are the cross-check: ``llama-imatrix`` computes llama.cpp's own matrix from the same text
(ours must equal it) and ``llama-quantize --imatrix`` must turn our imatrix file into the very file our export
writes. They are built once by the install (``make setup`` runs ``python -m amoeba_export.backends.gguf.tools``)
with the Makefile's portable llama.cpp flags (``CMAKE_ARGS``: never ``-march=native``), statically linked, into
the cache. ≈ 10 min on 2 cores (ggml, libllama and llama.cpp's ``common`` library).

Usage: ``python -m amoeba_export.backends.gguf.tools [--jobs N] [--force]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from amoeba_export.errors import ResourceError
from amoeba_export.paths import cache_subdir

from .reference import LLAMA_CPP_SDIST, llama_cpp_source

TOOLS = ("llama-quantize", "llama-imatrix")
# What the tools need and nothing else: static (no libllama.so of ours to collide with the runtime's), no
# tests/examples/server, no HTTPS (nothing is downloaded).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_OPENSSL=OFF")
# Without the Makefile's CMAKE_ARGS (a build started by hand): at least never llama.cpp's -march=native default.
FALLBACK_ARCH_ARGS = "-DGGML_NATIVE=OFF"
FIX = "run make setup, or: python -m amoeba_export.backends.gguf.tools (with the Makefile's CMAKE_ARGS)"


def tools_dir() -> Path:
    return cache_subdir("packages") / f"{LLAMA_CPP_SDIST.replace('==', '-')}-tools"


def tool_path(name: str) -> Path:
    """The built tool ``name`` (one of :data:`TOOLS`); a clear error when the install has not built it."""
    path = tools_dir() / "bin" / name
    if not os.access(path, os.X_OK):
        raise ResourceError(f"llama.cpp's {name} is not built ({path} is missing)", fix=FIX)
    return path


def tools_built() -> bool:
    return all(os.access(tools_dir() / "bin" / name, os.X_OK) for name in TOOLS)


def _build_tool(name: str) -> str | None:
    """``name`` on PATH, else beside this Python (a venv's pip-installed cmake/ninja wheels)."""
    local = Path(sys.executable).parent / name
    return shutil.which(name) or (str(local) if os.access(local, os.X_OK) else None)


def build_tools(*, jobs: int | None = None, force: bool = False) -> Path:
    """Configure and build :data:`TOOLS` from the cached sdist's ``vendor/llama.cpp``; returns the bin folder."""
    target = tools_dir()
    if tools_built() and not force:
        return target / "bin"
    cmake, ninja = _build_tool("cmake"), _build_tool("ninja")
    if cmake is None:
        # pip built llama-cpp-python with the cmake wheel of its isolated build environment, so a fresh machine
        # may have no cmake of its own: take the same wheels from the package registry into this environment.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake>=3.14", "ninja"], check=False)
        cmake, ninja = _build_tool("cmake"), _build_tool("ninja")
    if cmake is None:
        raise ResourceError("cmake is not installed (needed to build llama.cpp's tools)",
                            fix="install cmake and a C++ compiler (apt-get install cmake g++), then " + FIX)
    source = llama_cpp_source()
    arch_args = shlex.split(os.environ.get("CMAKE_ARGS") or FALLBACK_ARCH_ARGS)
    build = target.with_name(target.name + ".build")
    shutil.rmtree(build, ignore_errors=True)
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    jobs = jobs or os.cpu_count() or 1
    print(f"building {', '.join(TOOLS)} from {source} ({' '.join(arch_args)}, {jobs} jobs) …", flush=True)
    steps = [[cmake, "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS, *arch_args],
             [cmake, "--build", str(build), "--target", *TOOLS, "-j", str(jobs)]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ResourceError(f"building llama.cpp's tools failed at: {shlex.join(step)}\n{tail}", fix=FIX)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    for name in TOOLS:
        shutil.copy2(build / "bin" / name, tmp / "bin" / name)
    (tmp / "build.json").write_text(json.dumps({"source": str(source), "sdist": LLAMA_CPP_SDIST,
                                                "cmake": [*CMAKE_OPTIONS, *arch_args]}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    shutil.rmtree(build, ignore_errors=True)  # ≈ 300 MB of objects; the static binaries need none of it
    return target / "bin"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the tools exist")
    args = parser.parse_args(argv)
    try:
        print(build_tools(jobs=args.jobs, force=args.force))
    except ResourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
