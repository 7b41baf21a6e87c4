"""The main job as a deploy: the shipped default model to the laptop and 8 GB phone targets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..paths import cache_subdir
from ..targets import load_profile
from .pipeline import DeployOptions, deploy

DEMO_TARGETS = ("laptop", "android-8gb")


def deploy_demo(model: str | None = None, *, targets: tuple[str, ...] = DEMO_TARGETS, finetune_steps: int = 0,
                out: str | Path | None = None, options: DeployOptions | None = None, force: bool = False,
                budgets: dict[str, float] | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Plan (cached) → optional short elastic fine-tune → deploy to each target; returns the report paths.

    ``finetune_steps`` = 0 deploys straight from the plan (training on a 2-core CPU is slow); a positive
    value runs ``amoeba train`` for that many steps first and deploys the trained elastic checkpoint.
    ``budgets`` overrides budgets of every target (e.g. ``{"max_file_mb": 60}`` to force a small subnet).
    """
    from ..demo import ensure_plan
    from ..modelio import resolve_model

    model_dir = resolve_model(model)
    work = Path(out) if out is not None else cache_subdir("deploy-demo")
    source = cache_subdir("demo") / "plan"  # the plan `amoeba demo` computes: shared, computed once
    ensure_plan(model_dir, source)
    if finetune_steps > 0:
        source = _finetune(source, work / f"elastic-{finetune_steps}", finetune_steps, log)
    reports = []
    for name in targets:
        profile = load_profile(name)
        if budgets:
            profile = profile.with_budgets(**budgets)
        report = deploy(source, profile, work / f"deploy-{name}", options=options, force=force, log=log)
        log(f"{name}: report at {report}")
        reports.append(report)
    return reports


def _finetune(plan_dir: Path, out: Path, steps: int, log: Callable[[str], None]) -> Path:
    """A short elastic fine-tune through the ``train`` verb (reused when already there)."""
    from ..artifacts import read_meta
    from ..cli import main as cli_main
    from ..errors import AmoebaError, CheckpointError

    try:
        if read_meta(out).get("kind") == "elastic":
            log(f"fine-tune: reusing {out}")
            return out
    except CheckpointError:
        pass
    # --resume: a killed `make demo` continues from the run's last checkpoint (or starts over if it had none)
    rc = cli_main(["train", "--plan", str(plan_dir), "--out", str(out), "--steps", str(steps), "--resume"])
    if rc != 0:
        raise AmoebaError(f"the elastic fine-tune exited with {rc}", fix="run `amoeba train` alone to see why")
    return out
