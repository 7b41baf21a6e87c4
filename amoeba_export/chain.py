"""The whole pipeline on one model, stage by stage, every stage's outcome recorded instead of raised.

plan → [train → extract from the checkpoint] → extract (uniform and per-layer subnets) → export (GGUF F16/Q8_0,
ONNX fp32, ExecuTorch fp32) → validate. ``bench/any_model.py`` runs it on a tiny random model of every
family; tests run it per family.
An outcome is ``ok``, ``unsupported: …`` (a limit of the target runtime named by the architecture table,
e.g. llama.cpp has no graph for per-layer Qwen3 subnets), ``error: …`` or ``skipped: …`` (an earlier
stage it needs failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AmoebaError

EXPORTS: tuple[tuple[str, str], ...] = (("gguf", "F16"), ("gguf", "Q8_0"), ("onnx", "fp32"), ("executorch", "fp32"))

# Subnets of a tiny 4-layer model. Uniform widths without compensation give a stock checkpoint of the family
# (what every llama.cpp graph takes); per-layer widths with the default least-squares refit give amoeba_llama.
SUBNETS: dict[str, dict[str, Any]] = {
    "uniform": dict(depth=3, width=0.5, mode="uniform", compensate=False),
    "per-layer": dict(depth=3, width=0.6, mode="global"),
}

# Small but real settings: a plan in seconds, validation on a few hundred tokens, a short ExecuTorch cache.
PLAN_SETTINGS = dict(seq_len=64, width_tokens=512, depth_tokens=256, round_to=8)
EXPORT_OPTIONS: dict[str, dict[str, Any]] = {"gguf": {"progress": False, "threads": 1},
                                             "executorch": {"max_context": 256}}
VALIDATE_SETTINGS = dict(seq_len=32, max_tokens=128, threads=1)


@dataclass(frozen=True)
class ChainResult:
    stages: dict[str, str] = field(default_factory=dict)  # stage -> ok / unsupported: … / error: … / skipped: …
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.stages.items() if v.startswith(("error", "skipped"))]


def run_chain(model_dir: str | Path, root: str | Path, *, exports: Sequence[tuple[str, str]] = EXPORTS,
              subnets: dict[str, dict[str, Any]] | None = None, text_file: str | Path | None = None,
              validate: bool = True, calibration_seed: int = 0, train_steps: int = 0) -> ChainResult:
    """Run every stage on ``model_dir`` (a stock HF folder), writing under ``root``. ``train_steps`` > 0 adds a
    short elastic fine-tune on ``text_file`` and an extraction of the per-layer subnet from its checkpoint."""
    import torch

    from .backends import get_backend
    from .backends.gguf.writer import gguf_limits
    from .backends.meta import read_hf_config
    from .evaluation.validate import validate_artifact
    from .extract import extract_subnet
    from .plan import PlanConfig, build_plan

    root = Path(root)
    result = ChainResult()

    def stage(name: str, fn: Callable[[], Any], *, needs: Sequence[str] = ()) -> Any:
        missing = [n for n in needs if result.stages.get(n) != "ok"]
        if missing:  # after an unsupported stage this one is unsupported too, not a failure
            unsupported = result.stages.get(missing[0], "").startswith("unsupported")
            result.stages[name] = (f"unsupported: needs {missing[0]}" if unsupported
                                   else f"skipped: {missing[0]} did not succeed")
            return None
        started = time.perf_counter()
        try:
            out = fn()
        except Unsupported as exc:
            result.stages[name] = f"unsupported: {exc}"
            out = None
        except (AmoebaError, RuntimeError, ValueError, OSError, AssertionError) as exc:
            result.stages[name] = f"error: {type(exc).__name__}: {str(exc)[:400]}"
            out = None
        else:
            result.stages[name] = "ok"
        result.seconds[name] = round(time.perf_counter() - started, 2)
        return out

    def make_plan() -> Path:
        vocab = int(read_hf_config(model_dir)["vocab_size"])
        calibration = torch.randint(0, vocab, (1024,), generator=torch.Generator().manual_seed(calibration_seed))
        plan = build_plan(model_dir, PlanConfig(**PLAN_SETTINGS), progress=False, calibration=calibration)
        return plan.save(root / "plan", force=True)

    plan_dir = stage("plan", make_plan)
    if train_steps:
        from .finetune import TrainConfig
        from .finetune.trainer import train

        config = TrainConfig(steps=train_steps, seq_len=16, lr=1e-2, save_every=train_steps, shapes_per_step=2,
                             data_files=(str(text_file),) if text_file else ())
        stage("train", lambda: train(plan_dir, config, root / "run", force=True, progress=False), needs=["plan"])
        stage("extract:trained", lambda: extract_subnet(root / "run", root / "trained", force=True,
                                                        **SUBNETS["per-layer"]), needs=["train"])
    for sub, kwargs in (SUBNETS if subnets is None else subnets).items():
        sub_dir = stage(f"extract:{sub}", lambda kw=kwargs, s=sub: extract_subnet(plan_dir, root / s, force=True, **kw),
                        needs=["plan"])
        for backend, quant in exports:
            name = f"{backend}:{quant}:{sub}"

            def export(b=backend, q=quant, d=sub_dir, n=name) -> Any:
                if b == "gguf" and (limits := gguf_limits(read_hf_config(d))):
                    raise Unsupported("; ".join(limits))
                return get_backend(b).export(d, root / n.replace(":", "-"), q, force=True,
                                             **EXPORT_OPTIONS.get(b, {}))

            artifact = stage(name, export, needs=[f"extract:{sub}"])
            if validate:
                stage(f"validate:{name}", lambda a=artifact, d=sub_dir: validate_artifact(
                    a.path, d, text_file=text_file, progress=False, **VALIDATE_SETTINGS), needs=[name])
    return result


class Unsupported(Exception):
    """A stage the target runtime cannot take for this architecture (not a failure of the pipeline)."""
