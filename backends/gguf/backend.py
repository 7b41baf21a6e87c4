"""The GGUF backend: a plain HF folder → one .gguf file for llama.cpp, quantized by llama.cpp's own quantizer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from amoeba_export.artifacts import atomic_dir, write_meta
from amoeba_export.errors import BackendError, CheckpointError

from ..base import Artifact, Backend, Runner
from ..meta import copy_tokenizer, export_meta, read_hf_config, tool_versions
from .imatrix import FILE_NAME as IMATRIX_FILE
from .imatrix import SETTINGS as IMATRIX_SETTINGS
from .imatrix import Calibration, CalibrationConfig, calibration_for, write_imatrix
from .quantize import QUANT_TYPES, census, quantize
from .writer import write_gguf

UNQUANTIZED = ("F32", "F16")
OPTIONS = ("pre_tokenizer", "threads", "progress", "imatrix", "calibration_tokens")
MAX_THREADS = 1024


class GGUFBackend(Backend):
    name = "gguf"
    extra = "gguf"
    runtime_modules = ("llama_cpp", "gguf")
    runtime = "llama.cpp"
    crash_fix = ("llama-cpp-python was built for another CPU or with a broken fast path; rebuild it for a portable "
                 "baseline: make setup, or CMAKE_ARGS from the Makefile with pip install --force-reinstall "
                 "--no-cache-dir llama-cpp-python")
    quant_types = (*UNQUANTIZED, *QUANT_TYPES)
    default_quant = "Q4_K_M"

    def speed_twin(self, quant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Without the importance matrix: it steers rounding only, the tensor types (sizes, kernels) are the same."""
        return quant, {**options, "imatrix": "off"}

    def export(self, hf_dir: Path, out_dir: Path, quant: str = "Q4_K_M", *, force: bool = False,
               **options: Any) -> Artifact:
        """Options: ``pre_tokenizer`` (llama.cpp name, when the tokenizer is not in pretokenizers.json),
        ``threads`` (quantizer threads), ``progress`` (tqdm bars), ``imatrix`` (``auto``: Q4_0 and k-quants are
        quantized with llama.cpp's importance matrix computed on the calibration split when it can be read;
        ``on``: the same, missing data is an error; ``off``; or the path of a GGUF imatrix file) and
        ``calibration_tokens`` (tokens the matrix is computed on, default 16,384)."""
        if problems := self.option_problems(quant, options):
            raise BackendError("; ".join(problems), fix=f"use only: {', '.join(OPTIONS)}")
        quant = self.check_quant(quant)
        hf_dir = Path(hf_dir)
        started = time.perf_counter()
        model_file = f"model-{quant}.gguf"
        write = dict(name=hf_dir.name, pre_tokenizer=options.get("pre_tokenizer"),
                     progress=options.get("progress", True))
        with atomic_dir(out_dir, force=force) as tmp:
            calibration = Calibration(None)
            if quant in UNQUANTIZED:
                plan = write_gguf(hf_dir, tmp / model_file, dtype=quant, **write)
            else:
                # Quantize from F32 when the checkpoint is F32 (best accuracy); a 16-bit checkpoint loses
                # nothing through F16, and a 7B F32 intermediate would need twice the disk.
                dtype = str(read_hf_config(hf_dir).get("dtype") or read_hf_config(hf_dir).get("torch_dtype") or "")
                base = tmp / f".base-{'F16' if '16' in dtype else 'F32'}.gguf"
                plan = write_gguf(hf_dir, base, dtype="F16" if "16" in dtype else "F32", **write)
                calibration = calibration_for(hf_dir, quant, options.get("imatrix", "auto"), CalibrationConfig(
                    tokens=options.get("calibration_tokens", CalibrationConfig.tokens)))
                if calibration.imatrix is not None:
                    # Kept beside the model: `llama-quantize --imatrix imatrix.gguf` reproduces the file.
                    write_imatrix(tmp / IMATRIX_FILE, calibration.imatrix)
                quantize(base, tmp / model_file, quant, threads=options.get("threads") or os.cpu_count() or 1,
                         imatrix=calibration.imatrix, imatrix_file=IMATRIX_FILE)
                base.unlink()
            found = census(tmp / model_file, quant)
            copy_tokenizer(hf_dir, tmp / "tokenizer")  # HF tokenizer for text tools (validation, tasks)
            notes = [*plan.notes, *found.notes(quant), *([calibration.note] if calibration.note else [])]
            meta = export_meta(
                backend=self.name, quant=quant, hf_dir=hf_dir, folder=tmp, model_file=model_file, started=started,
                tools=tool_versions("gguf", "llama_cpp_python"), bytes_per_token=found.bytes_per_token,
                notes=notes, quant_label=found.label(quant),
                calibration=None if calibration.imatrix is None else calibration.imatrix.summary(IMATRIX_FILE),
                gguf={"arch": found.arch, "tensor_types": found.tensor_types, "n_tensors": found.n_tensors,
                      "fallback_tensors": found.fallback},
            )
            write_meta(tmp, meta)
        return Artifact.open(out_dir)

    def option_problems(self, quant: str, options: dict[str, Any]) -> list[str]:
        out = [f"unknown gguf export option {k!r} (supported are: {', '.join(OPTIONS)})"
               for k in sorted(set(options) - set(OPTIONS))]
        if "pre_tokenizer" in options and not isinstance(options["pre_tokenizer"], str):
            out.append(f"pre_tokenizer must be a llama.cpp pre-tokenizer name, got {options['pre_tokenizer']!r}")
        threads = options.get("threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
            out.append(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
        if not isinstance(options.get("progress", True), bool):
            out.append(f"progress must be true or false, got {options['progress']!r}")
        setting = options.get("imatrix", "auto")
        if not isinstance(setting, str) or (setting not in IMATRIX_SETTINGS and not Path(setting).is_file()):
            out.append(f"imatrix must be one of {', '.join(IMATRIX_SETTINGS)} or an existing GGUF imatrix file, "
                       f"got {setting!r}")
        tokens = options.get("calibration_tokens", CalibrationConfig.tokens)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < CalibrationConfig.seq_len:
            out.append(f"calibration_tokens must be an integer ≥ {CalibrationConfig.seq_len}, got {tokens!r}")
        return out

    def load(self, artifact: Artifact, *, threads: int | None = None, isolated: bool = True,
             checksums: bool = True, selfcheck: bool = True, **options: Any) -> Runner:
        """As :meth:`Backend.load`, after checking (once per build and CPU, cached) that llama.cpp decodes
        quantized files on this machine — see :mod:`.selfcheck`."""
        if selfcheck:
            from .selfcheck import ensure_llama_cpp_works

            ensure_llama_cpp_works(for_file=artifact.model_file)
        return super().load(artifact, threads=threads, isolated=isolated, checksums=checksums, **options)

    def open_runner(self, artifact: Artifact, *, threads: int | None = None, n_ctx: int | None = None) -> Runner:
        from .runner import LlamaCppRunner

        path = artifact.model_file  # sizes and checksums were verified by load()
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", fix="re-run amoeba export")
        return LlamaCppRunner(path, threads=threads, n_ctx=n_ctx)
