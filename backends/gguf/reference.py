"""llama.cpp's own converter as a reference for our writer: find it, run it, compare its file with ours.

``convert_hf_to_gguf.py`` ships inside the llama-cpp-python sdist that the install builds from
(``vendor/llama.cpp``, with its own ``gguf-py``); it is run as a child process, never imported here.
The converter names the pre-tokenizer by hashing the token ids of a fixed text, which only works for the
real tokenizers it lists; for others (tiny test tokenizers) :func:`convert_reference` tells it the name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amoeba_export.errors import ResourceError
from amoeba_export.paths import cache_subdir

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"

# Metadata whose values must agree between the converter's file and ours. ``{arch}.`` keys are compared
# without their architecture prefix, because the graphs differ on purpose (qwen2 is written as llama:
# see amoeba_export.architectures).
ARCH_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor")
GLOBAL_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
               "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
               "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix")

# Run as ``python -c`` in the child: the sdist's converter with a fixed pre-tokenizer name.
_CONVERT = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[3:]]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_source(*, download: bool = True) -> Path | None:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist in the cache (fetched with pip and unpacked once when
    ``download``); None when it is not there and ``download`` is False."""
    dest = cache_subdir("packages", "llama-cpp-python-0.3.36-sdist")
    unpacked = dest / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if (unpacked / "convert_hf_to_gguf.py").is_file():
        return unpacked
    archives = sorted(dest.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not archives and download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        LLAMA_CPP_SDIST, "-d", str(dest)], check=False)
        archives = sorted(dest.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not archives:
        if not download:
            return None
        raise ResourceError(f"could not download the {LLAMA_CPP_SDIST} sdist", fix=f"place it in {dest}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    return unpacked


def convert_reference(hf_dir: str | Path, out_file: str | Path, *, outtype: str = "f32", pre: str | None = None,
                      source: Path | None = None) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py on ``hf_dir``; ``pre`` names the pre-tokenizer for tokenizers its
    hash table does not know."""
    src = source or llama_cpp_source()
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(src), pre or "", str(hf_dir), "--outfile",
                           str(out_file), "--outtype", outtype], capture_output=True, text=True)
    if proc.returncode != 0 or not Path(out_file).is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}: {proc.stderr[-3000:]}")
    return Path(out_file)


def _value(field: Any) -> Any:
    """A GGUFReader field as a plain Python value (strings decoded, arrays as lists)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[-1].tolist()[0]


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """Architecture, metadata that matters (arch prefix stripped) and tensors (name -> (type, shape))."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _value(reader.fields["general.architecture"])
    meta = {}
    for key in ARCH_KEYS:
        if f"{arch}.{key}" in reader.fields:
            meta[key] = _value(reader.fields[f"{arch}.{key}"])
    for key in GLOBAL_KEYS:
        if key in reader.fields:
            meta[key] = _value(reader.fields[key])
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    return {"arch": arch, "meta": meta, "tensors": tensors}


@dataclass(frozen=True)
class Comparison:
    """How our GGUF differs from the converter's: empty lists and a tiny KL mean they agree."""

    arch: tuple[str, str]  # (ours, converter's)
    only_ours: list[str] = field(default_factory=list)
    only_theirs: list[str] = field(default_factory=list)
    type_or_shape: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    kl: float | None = None
    max_abs_diff: float | None = None

    @property
    def structure_ok(self) -> bool:
        return not (self.only_ours or self.only_theirs or self.type_or_shape or self.metadata)


def _float_close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def compare_structure(ours: str | Path, theirs: str | Path, *, ignore: tuple[str, ...] = ()) -> Comparison:
    """Tensor set, types and shapes, and the metadata in ARCH_KEYS/GLOBAL_KEYS (a key the converter writes
    must be in ours with the same value), except the keys in ``ignore``."""
    a, b = gguf_summary(ours), gguf_summary(theirs)
    ta, tb = a["tensors"], b["tensors"]
    mismatched = [f"{n}: ours {ta[n]} vs {tb[n]}" for n in sorted(set(ta) & set(tb)) if ta[n] != tb[n]]
    meta = []
    for key, want in b["meta"].items():
        if key in ignore:
            continue
        got = a["meta"].get(key)
        same = (isinstance(want, list) and isinstance(got, list) and len(got) == len(want)
                and all(map(_float_close, got, want))) or (not isinstance(want, list) and got is not None
                                                           and _float_close(got, want))
        if not same:
            meta.append(f"{key}: ours {str(got)[:80]} vs {str(want)[:80]}")
    return Comparison((a["arch"], b["arch"]), sorted(set(a["tensors"]) - set(b["tensors"])),
                      sorted(set(b["tensors"]) - set(a["tensors"])), mismatched, meta)


# Run in a child process (a native crash fails the comparison, not the caller): logits of both files.
_LOGITS = """
import json, sys
import numpy as np
from amoeba_export.backends.gguf.runner import LlamaCppRunner
ids = json.loads(sys.argv[3])
out = [LlamaCppRunner(p, threads=1, n_ctx=64).logits(ids).astype(np.float64) for p in sys.argv[1:3]]
def logp(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
a, b = logp(out[0]), logp(out[1])
kl = float((np.exp(b) * (b - a)).sum(-1).mean())
print(json.dumps({"kl": kl, "max_abs_diff": float(np.abs(out[0] - out[1]).max())}))
"""


def compare_with_converter(ours: str | Path, theirs: str | Path, ids: list[int], *,
                           ignore: tuple[str, ...] = ()) -> Comparison:
    """:func:`compare_structure` plus mean KL(converter ‖ ours) of next-token distributions over ``ids``."""
    structure = compare_structure(ours, theirs, ignore=ignore)
    proc = subprocess.run([sys.executable, "-c", _LOGITS, str(ours), str(theirs), json.dumps(ids)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"running both GGUF files failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return Comparison(structure.arch, structure.only_ours, structure.only_theirs, structure.type_or_shape,
                      structure.metadata, found["kl"], found["max_abs_diff"])
