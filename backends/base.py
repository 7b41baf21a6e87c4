"""The backend contract every export format implements.

A backend turns a *plain HF folder* into an artifact folder (model file(s), the tokenizer its runtime
needs, and ``meta.json``) and loads an artifact into a :class:`Runner`. Backends never see elastic code.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amoeba_export.artifacts import member_path, read_meta, verify_files
from amoeba_export.errors import BackendError, CheckpointError, RuntimeMissingError

ARTIFACT_KIND = "export"


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def meta_problems(meta: dict[str, Any]) -> list[str]:
    """Every field of an export meta.json that is missing or of the wrong type, found before anything reads it:
    validation, bench and deploy use these fields, and a list where a string belongs would otherwise end in a
    traceback far from the cause (or, for ``files``, skip the check the record exists for)."""
    from .meta import META_VERSION

    out = []
    if meta.get("version") != META_VERSION:
        out.append(f"version {meta.get('version')!r} is not {META_VERSION}")
    out += [f"{key} must be a non-empty string, got {meta.get(key)!r:.40}"
            for key in ("backend", "quant", "model_file") if not (isinstance(meta.get(key), str) and meta[key])]
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        out.append("files must be a non-empty mapping of file records")
    elif isinstance(meta.get("model_file"), str) and meta["model_file"] not in files:
        out.append(f"model_file {meta['model_file']!r} is not among the recorded files")
    out += [f"{key} must be a non-negative integer, got {meta[key]!r:.40}"
            for key in ("model_bytes", "bytes_per_token") if meta.get(key) is not None and not _is_int(meta[key])]
    notes = meta.get("notes", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        out.append("notes must be a list of strings")
    source = meta.get("source", {})
    if not isinstance(source, dict):
        out.append(f"source must be a mapping, got {type(source).__name__}")
    elif not isinstance(source.get("hf_dir"), str | None) or not isinstance(source.get("meta"), dict | None):
        out.append("source must hold hf_dir (a path) and meta (a mapping or null)")
    for key in ("shape", "tools"):
        if not isinstance(meta.get(key, {}), dict):
            out.append(f"{key} must be a mapping")
    return out


@dataclass(frozen=True)
class Artifact:
    """An exported model folder; ``meta`` is its meta.json (backend, quant, source, sizes, sha256...)."""

    path: Path
    meta: dict[str, Any] = field(compare=False)

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """The artifact at ``path``, once its meta.json holds every field of the right type and every file it
        records is there with its recorded size (sha256 is checked by :meth:`verify`, on load)."""
        meta = read_meta(path, kind=ARTIFACT_KIND)
        if isinstance(meta.get("model_file"), str):
            member_path(path, meta["model_file"])  # a name leaving the folder is refused as such
        if problems := meta_problems(meta):
            raise CheckpointError(f"{path}/meta.json is not a valid export record: " + "; ".join(problems),
                                  fix="re-run amoeba export for this folder; never edit meta.json by hand")
        artifact = cls(Path(path), meta)
        artifact.verify(checksums=False)
        return artifact

    @property
    def source_hf_dir(self) -> str | None:
        """The HF folder the artifact was exported from, as its meta records it."""
        return (self.meta.get("source") or {}).get("hf_dir")

    @property
    def backend(self) -> str:
        return self.meta["backend"]

    @property
    def quant(self) -> str:
        return self.meta["quant"]

    @property
    def model_file(self) -> Path:
        return member_path(self.path, self.meta["model_file"])

    def verify(self, *, checksums: bool = True) -> None:
        """Every file the meta records is in the folder with its recorded size (and sha256 with ``checksums``)."""
        verify_files(self.path, self.meta.get("files", {}), checksums=checksums)

    @property
    def size_bytes(self) -> int:
        return int(self.meta.get("model_bytes") or sum(f["bytes"] for f in self.meta.get("files", {}).values()))


class Runner(ABC):
    """A model loaded in its runtime: full-sequence logits and KV-cached generation."""

    threads: int | None = None

    @property
    def can_tokenize(self) -> bool:
        """Whether the runtime carries its own tokenizer (``tokenize(text) -> ids``), e.g. GGUF's embedded one."""
        return callable(getattr(self, "tokenize", None))

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[len(input_ids), vocab]`` logits of one sequence (no padding)."""

    @abstractmethod
    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        """New token ids after ``input_ids`` using the runtime's KV cache (greedy when temperature is 0)."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Free the runtime's resources."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """One export format. Subclasses set the class attributes and implement export/load."""

    name: str = ""
    extra: str = ""  # pip extra that installs the runtime: pip install 'amoeba-export[<extra>]'
    runtime_modules: tuple[str, ...] = ()
    runtime: str = ""  # the runtime's name in messages ("llama.cpp")
    crash_fix: str = ""  # what to do when the runtime dies by a signal
    isolate: bool = True  # load() runs the runtime in a child process unless told otherwise
    quant_types: tuple[str, ...] = ()
    default_quant: str = ""

    def check_runtime(self) -> None:
        missing = [m for m in self.runtime_modules if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeMissingError(
                f"the {self.name} backend needs {', '.join(missing)}, which is not installed",
                fix=f"pip install 'amoeba-export[{self.extra}]'",
            )

    def option_problems(self, quant: str, options: dict[str, Any]) -> list[str]:
        """Every problem of export ``options`` for ``quant``, found without exporting anything — so a target
        profile's ``[export]`` table fails on load, not after minutes of work. Subclasses list their options."""
        return [f"unknown {self.name} export option {k!r} (this backend takes none)" for k in sorted(options)]

    def speed_twin(self, quant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A quant type and options whose files have the same size and kernels as ``quant`` with ``options`` and
        export cheaper — what a speed calibration may export instead (e.g. without a calibrated rounding pass)."""
        return quant, options

    def check_quant(self, quant: str) -> str:
        canonical = {q.lower(): q for q in self.quant_types}
        if quant.lower() not in canonical:
            raise BackendError(f"unknown quant type {quant!r} for {self.name}; supported are: "
                               f"{', '.join(self.quant_types)}", fix="pick one of the supported types")
        return canonical[quant.lower()]

    @abstractmethod
    def export(self, hf_dir: Path, out_dir: Path, quant: str, *, force: bool = False,
               **options: Any) -> Artifact:
        """Write an artifact folder atomically (see amoeba_export.artifacts.atomic_dir)."""

    def load(self, artifact: Artifact, *, threads: int | None = None, isolated: bool = True,
             checksums: bool = True, **options: Any) -> Runner:
        """A :class:`Runner` for ``artifact``, once its files match what its meta records (sizes always, sha256
        with ``checksums``). ``isolated`` (default): the runtime runs in a child process, so a native crash
        raises :class:`~amoeba_export.errors.RuntimeCrashError` instead of killing this one; pass False only
        where the caller already is such a process (the benchmark worker)."""
        if artifact.backend != self.name:
            raise BackendError(f"{artifact.path} is a {artifact.backend} artifact, not {self.name}",
                               fix="load it with its own backend (amoeba_export.backends.load_artifact)")
        artifact.verify(checksums=checksums)
        if not (isolated and self.isolate):
            return self.open_runner(artifact, threads=threads, **options)
        from .isolation import IsolatedRunner

        return IsolatedRunner(self.name, artifact, threads=threads, runtime=self.runtime or self.name,
                              crash_fix=self.crash_fix, **options)

    @abstractmethod
    def open_runner(self, artifact: Artifact, *, threads: int | None = None, **options: Any) -> Runner:
        """The runtime loaded in this process (see :meth:`load`)."""
