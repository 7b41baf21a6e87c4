"""The elastic fine-tune loop on accelerate (DDP on CPU/GPU; bf16 on GPU; one process or many).

Every process runs the same K shapes on its own rows; one backward over all K losses syncs gradients
once. Checkpoints are written atomically (a hidden ``.partial`` folder renamed when complete) and carry
everything needed to continue bit-for-bit: adapter weights, optimizer and scheduler state, the step, and
the RNG state of every process. Data order, shapes and gate noise are pure functions of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import file_inventory, write_json, write_meta
from ..errors import CheckpointError, DataError, OutputExistsError
from ..identity import content_identity, stage_identity
from .checkpoint import (
    ELASTIC_KIND,
    ELASTIC_VERSION,
    WEIGHTS,
    checkpoint_name,
    checkpoints_dir,
    list_checkpoints,
    load_smol_weights,
    read_elastic_meta,
    resumable_checkpoint,
)
from .config import TrainConfig, resume_problems
from .data import TrainRows, load_train_rows
from .distill import SandwichSampler, ShapeSpace, distill_step_losses
from .model import SMoLModel

LOG = "log.jsonl"


@dataclass
class TrainResult:
    out: Path
    steps: int
    last_losses: list[float]
    seconds: float


def _lr_lambda(config: TrainConfig):
    def f(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_digest(model: SMoLModel) -> str:
    """sha256 of the trainable parameters: equal on every process iff the replicas agree bit-for-bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.trainable_state().items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _noise_seeds(seed: int, step: int, k: int) -> list[int]:
    return [(seed * 1_000_003 + step) * 64 + i for i in range(k)]


def _short_names(k: int) -> list[str]:
    return ["full", "small", *[f"rand{i}" for i in range(1, k - 1)]]


class Run:
    """State shared by the loop and the checkpoint writer."""

    def __init__(self, accelerator, plan, plan_dir: Path, config: TrainConfig, out: Path) -> None:
        self.acc, self.plan, self.plan_dir, self.config, self.out = accelerator, plan, plan_dir, config, out

    def qat(self) -> dict[str, str] | None:
        """What the run's forwards fake-quantized (None: a plain fp fine-tune); extraction ignores it."""
        c = self.config
        return None if c.qat is None else {"scheme": c.qat, "scales": c.qat_scales}

    def elastic_meta(self, step: int, *, final: bool, files: dict[str, Any]) -> dict[str, Any]:
        plan_identity = stage_identity(self.plan_dir)
        return {"kind": ELASTIC_KIND, "version": ELASTIC_VERSION, "plan_dir": str(self.plan_dir),
                "plan_identity": plan_identity, "model_dir": str(self.plan.model_dir),
                "compensate": self.plan.config.compensate,
                "smol": self.config.to_dict()["smol"], "train": self.config.to_dict(), "qat": self.qat(),
                "step": step, "final": final, "weights": WEIGHTS, "world_size": self.acc.num_processes, "files": files,
                "identity": content_identity(ELASTIC_KIND, files, plan=plan_identity)}


def _check_resume(ckpt: Path, config: TrainConfig, plan_dir: Path, world: int) -> dict[str, Any]:
    meta = read_elastic_meta(ckpt)
    try:
        saved = TrainConfig.from_dict(meta["train"])
    except Exception as exc:  # an unreadable config is an incompatible checkpoint
        raise CheckpointError(f"{ckpt} has an unreadable training config ({exc})",
                              fix="start a new run with --force or another --out") from exc
    problems = resume_problems(saved, config)
    if Path(meta["plan_dir"]).resolve() != plan_dir.resolve():
        problems.append(f"plan: checkpoint used {meta['plan_dir']}, requested {plan_dir}")
    elif meta.get("plan_identity") not in (None, stage_identity(plan_dir)):
        problems.append(f"plan: {plan_dir} was re-computed since the checkpoint was written (its content differs)")
    if meta.get("world_size") != world:
        problems.append(f"processes: checkpoint ran {meta.get('world_size')}, this run has {world}")
    for name in ("optimizer.pt", "scheduler.json", "state.json", *(f"rng-rank{r}.pt" for r in range(world))):
        if not (ckpt / name).is_file():
            problems.append(f"{name} is missing")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is incompatible with this run: " + "; ".join(problems),
                              fix="resume with the original settings, or start over with --force / a new --out")
    return meta


def train(plan_dir: str | Path, config: TrainConfig, out: str | Path, *, resume: bool = False,
          force: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune the plan's elastic model; writes ``out`` (an elastic checkpoint folder when finished)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..modelio import load_tokenizer
    from ..plan import Plan, load_elastic

    config = config.validate()
    started = time.perf_counter()
    acc = Accelerator(mixed_precision=config.mixed_precision)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out, plan_dir = Path(out).absolute(), Path(plan_dir).absolute()

    # Everything that can fail on bad input happens before the first write.
    plan = Plan.load(plan_dir)
    tokenizer = load_tokenizer(plan.model_dir)
    rows: TrainRows = load_train_rows(config, tokenizer)
    if len(rows) < config.batch_size * world:
        raise DataError(f"{rows.source} gives {len(rows)} rows of {config.seq_len} tokens, fewer than one global "
                        f"batch ({config.batch_size * world})", fix="add data or lower --seq-len/--batch-size")
    ckpt, damaged = resumable_checkpoint(out) if resume else (None, [])
    if ckpt is not None:
        _check_resume(ckpt, config, plan_dir, world)
        for bad, problems in damaged if main else ():
            print(f"checkpoint {bad.name} is damaged ({'; '.join(problems)}): resuming from {ckpt.name}",
                  file=sys.stderr)
    elif out.exists() and any(out.iterdir()) and not force:
        finished = (out / "meta.json").is_file()
        if not (resume and not finished):  # --resume of a run killed before its first checkpoint starts over
            what = "a finished run" if finished else "an unfinished run"
            raise OutputExistsError(f"{out} already holds {what}",
                                    fix="pass --resume to continue it, --force to start over, or another --out")
        if progress:
            print(f"{out} holds no checkpoint yet (the run was stopped before its first): starting over")
    space = ShapeSpace.from_plan(plan, config.width_mode)

    # Depth maps are fitted per shape on fixed weights: training (random shapes, moving LoRA) runs without
    # them; extraction of the trained checkpoint fits them on the merged weights.
    elastic, _ = load_elastic(plan_dir, depth_maps=False)
    if config.mixed_precision == "bf16":  # frozen base in bf16 halves its memory; LoRA stays fp32
        elastic.to(torch.bfloat16)
    model = SMoLModel(elastic, config.smol, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing)
    if config.qat is not None:  # forwards fake-quantize as the export recipe will; the weights stay fp32
        from .qat import attach_fake_quant, base_model

        attach_fake_quant(elastic, config.qat, scales=config.qat_scales)
    start_step = 0
    if ckpt is not None:
        model.load_trainable_state(load_smol_weights(ckpt))
        start_step = json.loads((ckpt / "state.json").read_text())["step"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Stepped by us once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    if ckpt is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    ddp_model, optimizer = acc.prepare(model, optimizer)
    if ckpt is not None:
        _set_rng_state(torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=True))
    else:
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)

    run = Run(acc, plan, plan_dir, config, out)
    sampler = SandwichSampler(space, config.shapes_per_step, config.seed)
    if main:
        if ckpt is None and out.exists():
            shutil.rmtree(out)  # --force: only now that model, data and config are known good
        out.mkdir(parents=True, exist_ok=True)
        for bad, _ in damaged:  # out of the checkpoint list: pruning must not keep it over the good ones
            os.replace(bad, bad.with_name(f".{bad.name}.damaged-{int(time.time())}"))
        if start_step < config.steps:
            (out / "meta.json").unlink(missing_ok=True)  # a continued run is unfinished until it ends
        _trim_log(out / LOG, start_step)
    acc.wait_for_everyone()
    writer = _tensorboard(out) if main else None

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return acc.reduce(t.to(acc.device), reduction="sum") if world > 1 else t

    def save(step: int) -> None:
        folder = checkpoints_dir(out)
        partial = folder / f".{checkpoint_name(step)}.partial"
        if main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), partial / f"rng-rank{rank}.pt")
        digests = gather_object([param_digest(model)])
        acc.wait_for_everyone()
        if main:
            save_file(model.trainable_state(), str(partial / WEIGHTS))
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            write_json(partial / "scheduler.json", scheduler.state_dict())
            write_json(partial / "state.json", {"step": step, "sampler": sampler.state(step),
                                                "data": {"rows": len(rows), "source": rows.source},
                                                "rank_param_sha256": digests})
            write_meta(partial, run.elastic_meta(step, final=False, files=file_inventory(partial)))
            target = folder / checkpoint_name(step)
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
            for _, old in list_checkpoints(out)[:-config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    names = _short_names(config.shapes_per_step)
    bar = tqdm(total=config.steps, initial=start_step, desc="elastic fine-tune", disable=not (progress and main))
    last: list[float] = []
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        shapes = sampler.shapes(step)
        ids, mask = rows.batch(step, rank, world, config.batch_size, config.seed)
        ids, mask = ids.to(acc.device), mask.to(acc.device)
        seeds = _noise_seeds(config.seed, step, len(shapes))
        teacher = None
        if config.qat is not None and config.qat_teacher == "base":
            # The frozen base model's full shape (no adapter, no fake quantization): a fixed target (config.py
            # QAT_TEACHERS has the measurements).
            with torch.no_grad(), acc.autocast(), base_model(elastic):
                teacher = elastic(ids, shapes[0])
        with acc.autocast():
            logits = ddp_model(ids, shapes, seeds)
        losses = distill_step_losses(logits, ids, mask, temperature=config.temperature,
                                     balance_losses=config.balance, world_size=world, reduce=reduce_sum,
                                     teacher=teacher)
        acc.backward(losses.total)
        if config.max_grad_norm > 0:
            acc.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = losses.per_shape
        if main:
            bar.update(1)
            bar.set_postfix({n: f"{v:.3f}" for n, v in zip(names, last)})
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                entry = {"step": step + 1, "lr": scheduler.get_last_lr()[0],
                         "loss": dict(zip(names, last)), "shapes": [s.name for s in shapes],
                         "seconds": round(time.perf_counter() - t0, 4)}
                with open(out / LOG, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                if writer is not None:
                    for n, v in zip(names, last):
                        writer.add_scalar(f"loss/{n}", v, step + 1)
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save(step + 1)
    bar.close()
    if writer is not None:
        writer.close()

    if main:
        tmp = out / f".{WEIGHTS}.tmp"
        save_file(model.trainable_state(), str(tmp))
        os.replace(tmp, out / WEIGHTS)
        meta = run.elastic_meta(config.steps, final=True, files={WEIGHTS: file_inventory(out)[WEIGHTS]})
        meta["train_seconds"] = round(time.perf_counter() - started, 1)
        write_meta(out, meta)
    acc.wait_for_everyone()
    return TrainResult(out, config.steps, last, time.perf_counter() - started)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the step being resumed from (a killed run may have logged beyond it), and lines that
    do not parse: a run killed mid-write leaves a torn last line. The checkpoint, not the log, is the record."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
