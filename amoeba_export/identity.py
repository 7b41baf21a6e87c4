"""Stage identity by content: what a stage's output is, not where it lies.

Every stage records its identity in its ``meta.json`` when it writes it, derived from the sha256 of its files
(recorded anyway, hashed once while writing) and the identity of its input:

* plan: its files (``plan.json``, ``width.safetensors``, ``gram.safetensors``) and model folder;
* elastic checkpoint: the plan's identity and its files (adapters, optimizer, …);
* subnet: the identity of the plan or checkpoint it was cut from, its shape and its reconstruction;
* export artifact: the subnet's identity, backend, quant and its files.

Caches and resumable stages key on these (perplexity caches, speed calibrations, deploy requests), so re-planning
into the same folder with other options — a new identity at the same path — makes everything downstream redo.
Folders written before identities were recorded fall back to their path and record, as the caches used to.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .artifacts import read_meta

IDENTITY = re.compile(r"[0-9a-f]{32}")
# Fields of a subnet's meta.json that do not change its weights (timings), left out of its identity.
_TIMINGS = ("fit_seconds", "extract_seconds", "total_seconds")


def digest(body: Any) -> str:
    """32 hex digits of the sha256 of ``body`` as canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


def checksums(files: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{name: sha256}`` of a ``file_inventory`` record: what a stage's identity is built from."""
    return {name: record["sha256"] for name, record in files.items()}


def content_identity(stage: str, files: dict[str, dict[str, Any]], **inputs: Any) -> str:
    """A stage's identity from its recorded file checksums and whatever else it was made from."""
    return digest({"stage": stage, "files": checksums(files), **inputs})


def subnet_identity(meta: dict[str, Any]) -> str | None:
    """A subnet's identity from its record: its source's identity, shape and reconstruction (None when the
    record names no source identity: a folder extracted before identities were recorded)."""
    if not isinstance(meta.get("source_identity"), str):
        return None
    rec = meta.get("reconstruction")
    rec = {k: v for k, v in rec.items() if k not in _TIMINGS} if isinstance(rec, dict) else rec
    return digest({"stage": "subnet", "source": meta["source_identity"], "shape": meta.get("shape"),
                   "reconstruction": rec, "model_type": meta.get("model_type"),
                   "compensated": meta.get("compensated")})


def stage_identity(folder: str | Path) -> str:
    """The identity of a stage folder (plan, elastic checkpoint, subnet, export artifact) from its meta.json."""
    meta = read_meta(folder)
    recorded = meta.get("identity")
    if isinstance(recorded, str) and IDENTITY.fullmatch(recorded):
        return recorded
    if meta.get("kind") == "hf_model" and (derived := subnet_identity(meta)) is not None:
        return derived
    # Written before identities were recorded: its path and record, so at least another folder never matches.
    return digest({"path": str(Path(folder).resolve()), "meta": meta})


def identity_or_none(folder: str | Path) -> str | None:
    """:func:`stage_identity`, or None for a folder without a meta.json (a user's own HF folder)."""
    return stage_identity(folder) if (Path(folder) / "meta.json").is_file() else None
