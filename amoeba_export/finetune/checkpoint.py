"""Elastic checkpoint folders: what a fine-tune writes and what extraction reads.

A folder of kind ``"elastic"`` (the run folder once finished, and every ``checkpoints/step-N``) holds
``smol.safetensors`` (LoRA experts + gate, nothing pickled) and ``meta.json`` (last file written):
``{"kind": "elastic", "version": 1, "plan_dir", "model_dir", "compensate", "smol": {...}, "train": {...},
"step", "final", "weights": "smol.safetensors", "files": {...}}``. Training checkpoints add
``optimizer.pt`` (tensors only, read with ``weights_only=True``), ``scheduler.json``, ``state.json`` and
one ``rng-rank{r}.pt`` per process.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import META, file_problems, read_meta
from ..errors import CheckpointError
from ..identity import stage_identity
from .config import CONFIG_VERSION, SMoLConfig, TrainConfig

if TYPE_CHECKING:
    from ..elastic import ElasticLM
    from ..plan import Plan
    from .model import ShapeGate

ELASTIC_KIND = "elastic"
ELASTIC_VERSION = 1
WEIGHTS = "smol.safetensors"
RESUME_FILES = (WEIGHTS, "optimizer.pt", "scheduler.json", "state.json")
STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints of a run (a folder counts once its meta.json exists), by step."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_problems(ckpt: Path) -> list[str]:
    """What is damaged in a training checkpoint, found before any of it is loaded: files that differ from the
    sizes and sha256 its meta.json records (a truncated ``optimizer.pt``, a garbled ``state.json``), or a
    ``state.json`` that does not hold the checkpoint's step. Empty when it can be resumed from."""
    try:
        meta = read_elastic_meta(ckpt)
    except CheckpointError as exc:
        return [str(exc)]
    if not meta.get("files"):
        return [f"{META} records no file sizes and checksums"]
    if problems := file_problems(ckpt, meta["files"]):
        return problems
    # Resuming loads these; one that is present but unrecorded could not have been checked.
    if unrecorded := [n for n in RESUME_FILES if n not in meta["files"] and (ckpt / n).exists()]:
        return [f"{', '.join(unrecorded)} not recorded in {META}"]
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except FileNotFoundError:
        return []  # a missing file is an incompatibility (another process count), reported by the trainer
    except (OSError, ValueError) as exc:
        return [f"state.json does not parse ({exc})"]
    if not isinstance(state, dict) or state.get("step") != meta.get("step"):
        return [f"state.json does not hold the checkpoint's step {meta.get('step')}"]
    return []


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest intact checkpoint of a run (None when it has none) and the damaged newer ones passed over.

    A run killed while its disk filled, or a file altered later, leaves a checkpoint that looks complete; the
    previous one is still good, so resuming falls back to it. When every checkpoint is damaged, one
    CheckpointError names the newest one's bad files."""
    damaged = []
    for _, ckpt in reversed(list_checkpoints(run_dir)):
        if not (problems := checkpoint_problems(ckpt)):
            return ckpt, damaged
        damaged.append((ckpt, problems))
    if not damaged:
        return None, []
    ckpt, problems = damaged[0]
    others = f" (and {len(damaged) - 1} older one(s) are damaged too)" if len(damaged) > 1 else ""
    raise CheckpointError(f"cannot resume {run_dir}: checkpoint {ckpt} is damaged: {'; '.join(problems)}; "
                          f"no earlier complete checkpoint exists{others}",
                          fix="restore the named file, or start over with --force")


def read_elastic_meta(folder: str | Path) -> dict[str, Any]:
    meta = read_meta(folder, kind=ELASTIC_KIND)
    if meta.get("version") != ELASTIC_VERSION:
        raise CheckpointError(f"elastic checkpoint version {meta.get('version')} in {folder} is not supported "
                              f"(this is {ELASTIC_VERSION})", fix="re-train with this amoeba-export version")
    for key in ("plan_dir", "smol", "train", "weights"):
        if key not in meta:
            raise CheckpointError(f"{folder}/meta.json lacks {key!r}", fix="pass a folder written by amoeba train")
    return meta


def smol_config_of(meta: dict[str, Any]) -> SMoLConfig:
    return TrainConfig.from_dict({"smol": meta["smol"], "version": CONFIG_VERSION}).smol


def load_smol_weights(folder: str | Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})", fix="use another checkpoint of the run") from exc


def load_trained_elastic(ckpt_dir: str | Path, *, compensate: str | bool | None = None,
                         depth_maps: bool | None = None, depth_map_tokens: int | None = None,
                         ) -> tuple[ElasticLM, Plan, ShapeGate | None]:
    """The plan's elastic model with the trained SMoL adapters attached, its plan and the shared gate
    (None for single-LoRA). Call :func:`merge_for_shape` before reading ``effective_weight()``.

    Compensation defaults to what the run trained with. Depth maps (plan default) are fitted per shape on
    the LoRA-merged weights — the weights the extracted subnet will have — the first time a shape runs."""
    from ..plan import load_elastic
    from .model import SMoLModel, merge_for_shape

    meta = read_elastic_meta(ckpt_dir)
    plan_dir = Path(meta["plan_dir"])
    if not (plan_dir / "meta.json").is_file():
        raise CheckpointError(f"the plan {plan_dir} that {ckpt_dir} was trained on is missing",
                              fix="restore the plan folder or re-train")
    if meta.get("plan_identity") not in (None, stage_identity(plan_dir)):
        # The adapters were trained on that plan's permutation; another plan's would scramble them.
        raise CheckpointError(f"the plan {plan_dir} was re-computed after {ckpt_dir} was trained on it",
                              fix="restore the plan the run used, or re-train on the new one")
    comp = meta.get("compensate") if compensate is None else compensate
    elastic, plan = load_elastic(plan_dir, compensate=comp, depth_maps=depth_maps, depth_map_tokens=depth_map_tokens)
    # A quantization-aware run (meta["qat"]) loads the same way, without fake quantization: extraction merges the
    # fp32 LoRA into the fp32 weights and the export recipe quantizes them, as the QAT forward did (finetune/qat.py).
    wrapper = SMoLModel(elastic, smol_config_of(meta))
    wrapper.load_trainable_state(load_smol_weights(ckpt_dir))
    wrapper.eval()
    # Extraction calls ``elastic.merge_for_shape(shape)`` when present (amoeba_export.extract.prepare_shape).
    object.__setattr__(elastic, "merge_for_shape", functools.partial(merge_for_shape, elastic))
    return elastic, plan, wrapper.gate
