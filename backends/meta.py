"""What every backend writes into its artifact's meta.json, built one way for all of them.

A backend calls :func:`export_meta` as the last step inside ``atomic_dir`` and passes the result to
``write_meta``; fields a backend knows better (``bytes_per_token``, ``notes``) come in as arguments.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from amoeba_export.artifacts import file_inventory, read_meta
from amoeba_export.errors import CheckpointError
from amoeba_export.identity import content_identity, identity_or_none

META_VERSION = 1

# Files a tokenizer may need; copied next to every artifact so any runner can turn text into ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", fix="pass an HF folder written by save_pretrained") from exc


def layer_widths(config: dict[str, Any]) -> dict[str, list[int]]:
    """Per-layer query heads, KV heads and MLP widths of a Llama-family (or amoeba_llama) config."""
    n = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    return {
        "q_heads": [int(x) for x in config.get("layer_num_attention_heads") or [heads] * n],
        "kv_heads": [int(x) for x in config.get("layer_num_key_value_heads") or [kv] * n],
        "mlp": [int(x) for x in config.get("layer_intermediate_sizes") or [int(config["intermediate_size"])] * n],
    }


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def model_summary(hf_dir: str | Path) -> dict[str, Any]:
    """Shape and size of an HF folder, from its config alone (no weights loaded)."""
    cfg = read_hf_config(hf_dir)
    widths = layer_widths(cfg)
    hidden, hd, vocab = int(cfg["hidden_size"]), head_dim(cfg), int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    params = vocab * hidden * (1 if tied else 2) + hidden
    for q, kv, m in zip(widths["q_heads"], widths["kv_heads"], widths["mlp"]):
        params += 2 * hidden + hidden * hd * (2 * q + 2 * kv) + 3 * hidden * m
    uniform = all(len(set(v)) <= 1 for v in widths.values())
    return {
        "model_type": cfg.get("model_type"),
        "layers": int(cfg["num_hidden_layers"]),
        "hidden_size": hidden,
        "head_dim": hd,
        "vocab_size": vocab,
        "tied_embeddings": tied,
        "uniform": uniform,
        **widths,
        "params": params,  # weights only; bias vectors are negligible and left out
    }


def tool_versions(*dists: str) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("amoeba-export", *dists):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_gb() -> float:
    """Peak resident memory of this process (GiB), from ``VmHWM``.

    Not ``getrusage().ru_maxrss``: Linux carries it across fork and exec, so a worker started by a process
    holding 4 GB reports at least 4 GB whatever it used itself. ``VmHWM`` belongs to the address space,
    which exec replaces. Exports and benchmarks here run in-process (no child processes to add).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**20, 3)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # non-Linux fallback


def copy_tokenizer(hf_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy the tokenizer files an HF folder has into ``dest``; returns the names copied."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def export_meta(*, backend: str, quant: str, hf_dir: str | Path, folder: str | Path, model_file: str,
                started: float, tools: dict[str, str], bytes_per_token: int | None = None,
                notes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The artifact's meta.json: call it after every file of ``folder`` is written (sizes and sha256 are final)."""
    folder = Path(folder)
    try:
        source_meta = read_meta(hf_dir)
    except CheckpointError:
        source_meta = None  # a user's own HF folder has no meta.json
    files = file_inventory(folder)
    model_bytes = files[model_file]["bytes"] if model_file in files else None
    source_identity = identity_or_none(hf_dir)  # None: a user's own HF folder (no record, no identity)
    return {
        "kind": "export",
        "version": META_VERSION,
        "backend": backend,
        "quant": quant,
        "model_file": model_file,
        "source": {"hf_dir": str(Path(hf_dir).resolve()), "meta": source_meta},
        "source_identity": source_identity,
        "identity": content_identity("export", files, source=source_identity, backend=backend, quant=quant),
        "shape": model_summary(hf_dir),
        "tools": tools,
        "files": files,
        "model_bytes": model_bytes,
        # Weight bytes a runtime reads per generated token (the memory-bandwidth bound uses it).
        "bytes_per_token": bytes_per_token if bytes_per_token is not None else model_bytes,
        "export_seconds": round(time.perf_counter() - started, 2),
        "export_peak_rss_gb": peak_rss_gb(),
        "notes": list(notes or []),
        **extra,
    }
