"""llama.cpp's quantizer (through llama-cpp-python) and a census of what it actually wrote.

llama.cpp silently falls back to another type for a tensor whose rows are not a multiple of the target
type's block (256 for k-quants, 32 for Q4_0/Q8_0); SmolLM2's 576-wide rows do that even at full size.
The census reads the written file and names every such tensor, so reports never hide it.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amoeba_export.errors import BackendError

if TYPE_CHECKING:
    from .imatrix import IMatrix

# A quant name is qualified in the artifact's label once at least this share of its weight matrices fell back:
# a "Q4_K_M" file of a hidden-896 model holds no Q4_K tensor at all, and the name alone would say it does.
LABEL_FALLBACK_SHARE = 0.5

# quant name -> (llama_cpp ftype constant, the main GGML type it aims for)
QUANT_TYPES: dict[str, tuple[str, str]] = {
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K"),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K"),
}


# Quant types whose llama.cpp quantizer weighs columns by an importance matrix (ggml's quantize_q4_0 and the
# k-quants take ``quant_weights``; quantize_q8_0 ignores them, so an imatrix would only cost a calibration pass).
CALIBRATED = frozenset({"Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"})

# GGUF keys llama-quantize writes when it quantizes with an imatrix (tools/quantize/quantize.cpp), so a file we
# quantize says so exactly as one of llama.cpp's own does.
KEY_IMATRIX_FILE = b"quantize.imatrix.file"
KEY_IMATRIX_DATASET = b"quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = b"quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = b"quantize.imatrix.chunks_count"


def quantize(src: Path, dst: Path, quant: str, *, threads: int, imatrix: IMatrix | None = None,
             imatrix_file: str = "") -> None:
    """llama.cpp's quantizer through llama-cpp-python; with ``imatrix`` it gets the importance matrix as
    ``llama_model_quantize_params.imatrix`` (a C array of name/values/size, what ``llama-quantize --imatrix``
    builds from the file) and the ``quantize.imatrix.*`` keys ``llama-quantize`` writes (``imatrix_file`` names
    the file, as its command line would)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant][0])
    params.nthread = threads
    keep = []  # the C arrays point into these; they must live until the call returns
    if imatrix is not None:
        keep = _imatrix_params(params, imatrix, imatrix_file)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not dst.is_file():
        raise BackendError(f"llama.cpp's quantizer failed on {src.name} for {quant} (return code {rc})",
                           fix="re-run with --quant F16 to check that the unquantized file loads")


@dataclass(frozen=True)
class Census:
    """Types and sizes of the tensors in a GGUF file."""

    arch: str
    tensor_types: dict[str, int]  # GGML type -> count
    fallback: list[dict] = field(default_factory=list)  # tensors whose rows the target type cannot hold
    bytes_per_token: int = 0
    n_tensors: int = 0
    n_matrices: int = 0  # 2-D tensors: the ones the quantizer targets (norms and biases stay F32)
    hidden_size: int = 0

    def fallback_share(self) -> float:
        return len(self.fallback) / self.n_matrices if self.n_matrices else 0.0

    def label(self, quant: str) -> str:
        """``quant``, or e.g. ``Q4_K_M (92 % Q5_0/Q8_0 fallback)`` when most weight matrices fell back."""
        if not self.fallback or self.fallback_share() < LABEL_FALLBACK_SHARE:
            return quant
        types = "/".join(sorted({t["type"] for t in self.fallback}))
        return f"{quant} ({round(100 * self.fallback_share())} % {types} fallback)"

    def notes(self, quant: str) -> list[str]:
        if not self.fallback:
            return []
        target = QUANT_TYPES[quant][1]
        block = self.fallback[0]["block"]
        cols = sorted({t["row"] for t in self.fallback})
        got = Counter(t["type"] for t in self.fallback)
        note = (f"{len(self.fallback)} of {self.n_matrices} weight matrices ({round(100 * self.fallback_share())} %) "
                f"could not use {target}-family types and fell back (rows of {', '.join(map(str, cols))} are not "
                f"multiples of {block}): " + ", ".join(f"{n}×{t}" for t, n in sorted(got.items())))
        # Rows are input widths: MLP widths (down_proj) and head counts (o_proj) are the subnet's to choose, the
        # hidden size (every other matrix) is not.
        advice = []
        if any(c != self.hidden_size for c in cols):
            advice.append(f"extract with --round-to {block} so MLP widths are multiples of {block}")
        if self.hidden_size in cols:
            advice.append(f"the hidden size {self.hidden_size} is not a multiple of {block}, so its matrices fall "
                          "back at any width: Q8_0 or Q4_0 (blocks of 32) quantize them as named")
        return [note + "; " + "; ".join(advice)]


def census(path: Path, quant: str) -> Census:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    types = Counter(t.tensor_type.name for t in reader.tensors)
    hidden = reader.fields.get(f"{arch}.embedding_length")
    hidden_size = int(hidden.parts[-1][0]) if hidden is not None else 0
    names = {t.name for t in reader.tensors}
    fallback = []
    if quant in QUANT_TYPES:
        target = gguf.GGMLQuantizationType[QUANT_TYPES[quant][1]]
        block = gguf.GGML_QUANT_SIZES[target][0]
        for t in reader.tensors:
            row = int(t.shape[0])  # GGUF lists the contiguous (row) dimension first
            if len(t.shape) == 2 and row % block:
                fallback.append({"name": t.name, "type": t.tensor_type.name, "row": row, "block": block})
    # Decoding one token reads every weight once, except the embedding table (one row) when the output
    # projection has its own tensor.
    skip = {"token_embd.weight"} if "output.weight" in names else set()
    per_token = sum(int(t.n_bytes) for t in reader.tensors if t.name not in skip)
    matrices = sum(len(t.shape) == 2 for t in reader.tensors)
    return Census(arch, dict(types), fallback, per_token, len(reader.tensors), matrices, hidden_size)


def _imatrix_params(params, imatrix: IMatrix, imatrix_file: str) -> list:
    import llama_cpp
    import numpy as np

    values = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in imatrix.values().items()}
    names = {name: name.encode() for name in values}
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()  # zeroed: the last is the terminator
    for entry, (name, v) in zip(entries, values.items()):
        entry.name = names[name]
        entry.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = v.size
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    kv = [(KEY_IMATRIX_FILE, imatrix_file.encode()[:127]), (KEY_IMATRIX_DATASET, imatrix.dataset.encode()[:127]),
          (KEY_IMATRIX_ENTRIES, len(values))]
    if imatrix.chunk_count > 0:
        kv.append((KEY_IMATRIX_CHUNKS, imatrix.chunk_count))
    overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()  # zeroed key: the terminator
    for o, (key, value) in zip(overrides, kv):
        o.key = key
        if isinstance(value, bytes):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    return [values, names, entries, overrides]
