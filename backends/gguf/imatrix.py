"""llama.cpp's importance matrix, computed in PyTorch for the subnet's own weights.

llama.cpp's k-quant and Q4_0 quantizers choose each block's scale (and k-quants their mins) to minimise a
weighted squared error; with an importance matrix the weight of column j of a matrix is the mean of x_j² over
calibration tokens, x being that matrix's input (``llama-imatrix``'s ``in_sum2 / counts``). Without one every
column weighs alike (plus llama.cpp's own heuristic), so a column whose input is 50× larger than the rest is
rounded as carelessly as any other — exactly the outlier channels small LLMs have.

We compute the same statistic with forward pre-hooks on the HF model's linears (any shape: per-layer widths
just mean other column counts), over calibration rows from :func:`amoeba_export.data.measurement_rows`, and
write it in llama.cpp's GGUF imatrix format (``<tensor>.in_sum2`` and ``<tensor>.counts``, F32, plus
``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``; the reader is
``common/imatrix-loader.cpp`` of the vendored llama.cpp), so ``llama-quantize --imatrix`` takes our file and
``llama-imatrix``'s file can be read back here. Like ``llama-imatrix`` (without ``--process-output``) only the
``blk.*`` matrices get entries: the output / tied embedding matrix is quantized as llama.cpp always does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amoeba_export.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# GGUF keys and tensor suffixes of llama.cpp's imatrix format (common/imatrix-loader.h, tools/imatrix).
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
FILE_NAME = "imatrix.gguf"


@dataclass(frozen=True)
class CalibrationConfig:
    """Which tokens the importance matrix is computed on. 16,384 tokens in rows of 512 (llama-imatrix's chunk
    size) is what the plan's width statistics use too; the pass is one forward per row (≈ 20 s for 135M
    parameters on 2 cores)."""

    text: str = "calibration"  # a name of data.TEXTS
    tokens: int = 16_384
    seq_len: int = 512


@dataclass(frozen=True)
class IMatrix:
    """Per GGUF weight matrix: the sum of squared inputs per column and the number of tokens summed."""

    sums: dict[str, np.ndarray]  # gguf tensor name -> [in_features] float64 (float32 when read from a file)
    counts: dict[str, int]
    dataset: str  # what the rows were read from, as a measurement quotes it
    chunk_size: int  # tokens per row
    chunk_count: int  # rows

    def values(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer receives per tensor: ``in_sum2 / counts`` in float32, computed as
        ``llama-quantize`` does after reading the file (so both routes hand over identical numbers)."""
        out = {}
        for name, sums in self.sums.items():
            count = np.float32(self.counts[name])
            out[name] = (sums.astype(np.float32) / count if count > 0 else np.ones_like(sums, np.float32))
        return out

    def summary(self, file: str | None = None) -> dict:
        """What the artifact's meta records."""
        return {"method": "llama.cpp importance matrix (mean squared input per column)", "text": self.dataset,
                "tokens": self.chunk_size * self.chunk_count, "rows": self.chunk_count, "seq_len": self.chunk_size,
                "entries": len(self.sums), **({"file": file} if file else {})}


def compute_imatrix(hf_dir: str | Path, rows: torch.Tensor, *, dataset: str) -> IMatrix:
    """The importance matrix of ``hf_dir``'s ``blk.*`` matrices over token ``rows`` ([n, seq_len])."""
    import torch

    from amoeba_export.modelio import load_model

    from ..meta import read_hf_config
    from .writer import _gguf_name, plan_gguf

    hf_dir = Path(hf_dir)
    written = set(plan_gguf(hf_dir).tensors)
    cfg = read_hf_config(hf_dir)
    n_layers = int(cfg["num_hidden_layers"])
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    # A 16-bit checkpoint runs in its own dtype (a 7B model in fp32 would need 28 GB); sums are float64 anyway.
    model = load_model(hf_dir, dtype=torch.bfloat16 if "bfloat16" in dtype else None)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def collect(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).double()
            sums[name] = sums[name] + (x * x).sum(0) if name in sums else (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        name = _gguf_name(f"{module_name}.weight", n_layers)
        if isinstance(module, torch.nn.Linear) and name in written and name.startswith("blk."):
            hooks.append(module.register_forward_pre_hook(collect(name)))
    if not hooks:
        raise CheckpointError(f"{hf_dir} has no decoder weight matrices to calibrate",
                              fix="export an HF folder of a Llama-family model")
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None].long())
    finally:
        for h in hooks:
            h.remove()
    return IMatrix({k: v.numpy() for k, v in sums.items()}, counts, dataset, int(rows.shape[1]), int(rows.shape[0]))


def write_imatrix(path: str | Path, imatrix: IMatrix) -> Path:
    """``imatrix`` in llama.cpp's GGUF imatrix format (what ``llama-imatrix`` writes by default)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    try:
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, [imatrix.dataset])
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):  # llama-imatrix's order: deterministic by name
            # numpy [1, n] is ggml's [n, 1]: one row of sums (dense matrices have a single "expert")
            writer.add_tensor(name + SUM_SUFFIX, np.asarray(imatrix.sums[name], np.float32)[None])
            writer.add_tensor(name + COUNT_SUFFIX, np.full((1, 1), imatrix.counts[name], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(path)


def read_imatrix(path: str | Path) -> IMatrix:
    """A GGUF imatrix file (ours or ``llama-imatrix``'s); dense matrices only (no MoE experts here)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/struct.error/OSError for a damaged file
        raise CheckpointError(f"cannot read the imatrix file {path}: {exc}",
                              fix="pass a GGUF imatrix written by llama-imatrix or amoeba export") from exc
    tensors = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors}
    sums = {k[: -len(SUM_SUFFIX)]: v for k, v in tensors.items() if k.endswith(SUM_SUFFIX)}
    counts = {k[: -len(COUNT_SUFFIX)]: v for k, v in tensors.items() if k.endswith(COUNT_SUFFIX)}
    if not sums or set(sums) != set(counts) or any(len(c) != 1 for c in counts.values()):
        raise CheckpointError(f"{path} is not a dense-model GGUF imatrix (in_sum2/counts pairs)",
                              fix="pass a GGUF imatrix written by llama-imatrix or amoeba export")

    def field(key: str, default):
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    datasets = field(KEY_DATASETS, [])
    return IMatrix(sums, {k: round(float(v[0])) for k, v in counts.items()}, str(datasets[0]) if datasets else "",
                   int(field(KEY_CHUNK_SIZE, 0)), int(field(KEY_CHUNK_COUNT, 0)))


# The ``imatrix`` export option: how each setting gets its matrix (a path to a GGUF imatrix is the fourth kind).
SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class Calibration:
    """What the export quantizes with: an importance matrix, or none and why (the note goes into the meta)."""

    imatrix: IMatrix | None
    note: str = ""


def calibration_for(hf_dir: str | Path, quant: str, setting: str, config: CalibrationConfig = CalibrationConfig()
                    ) -> Calibration:
    """``auto``: an imatrix from the calibration split when ``quant`` uses one and the data can be read (else
    none, said in the note); ``on``: the same, but missing data is an error; ``off``: none; any other string is
    the path of a GGUF imatrix file (``llama-imatrix``'s or one written by an earlier export)."""
    from amoeba_export.data import measurement_rows
    from amoeba_export.errors import BackendError, DataError, ResourceError
    from amoeba_export.modelio import load_tokenizer

    from .quantize import CALIBRATED

    if quant not in CALIBRATED:
        return Calibration(None)  # the quantizer would ignore it
    if setting == "off":
        return Calibration(None, f"{quant} quantized without an importance matrix (imatrix=off)")
    if setting not in SETTINGS:
        return Calibration(read_imatrix(setting), f"{quant} quantized with the importance matrix {setting}")
    try:
        rows = measurement_rows(config.text, load_tokenizer(hf_dir), config.seq_len, config.tokens)
    except (DataError, ResourceError, CheckpointError) as exc:
        if setting == "on":
            raise BackendError(f"no calibration data for the importance matrix: {exc}",
                               fix="run amoeba prepare (fetches the corpora), or export with "
                                   "--option imatrix=off") from exc
        return Calibration(None, f"{quant} quantized without an importance matrix: no calibration data ({exc})")
    imatrix = compute_imatrix(hf_dir, rows.rows, dataset=rows.label())
    return Calibration(imatrix, f"{quant} quantized with an importance matrix from {rows.label()}")
