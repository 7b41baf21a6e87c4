"""The main job as a deploy: the shipped default model to the laptop and 8 GB phone targets."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..paths import cache_subdir
from ..targets import load_profile
from .pipeline import STAGES, DeployOptions, deploy, load_manifest

DEMO_TARGETS = ("laptop", "android-8gb")


def deploy_demo(model: str | None = None, *, targets: tuple[str, ...] = DEMO_TARGETS, finetune_steps: int = 0,
                out: str | Path | None = None, options: DeployOptions | None = None, force: bool = False,
                budgets: dict[str, float] | None = None, log: Callable[[str], None] = print,
                timings: list[Timing] | None = None) -> list[Path]:
    """Plan (cached) → optional short elastic fine-tune → deploy to each target; returns the report paths.

    ``finetune_steps`` = 0 deploys straight from the plan (training on a 2-core CPU is slow); a positive
    value runs ``amoeba train`` for that many steps first and deploys the trained elastic checkpoint.
    ``budgets`` overrides budgets of every target (e.g. ``{"max_file_mb": 60}`` to force a small subnet).
    ``timings``: where the time went is appended to it (the fine-tune, then every target's stages).
    """
    from ..demo import ensure_plan
    from ..modelio import resolve_model

    started_all = time.time()
    model_dir = resolve_model(model)
    work = Path(out) if out is not None else cache_subdir("deploy-demo")
    source = cache_subdir("demo") / "plan"  # the plan `amoeba demo` computes: shared, computed once
    ensure_plan(model_dir, source)
    if finetune_steps > 0:
        source = _finetune(source, work / f"elastic-{finetune_steps}", finetune_steps, log)
        if timings is not None:
            from ..artifacts import read_meta

            # train_seconds: what the run took, in this run or (meta.json written before it started) an earlier one
            meta = read_meta(source)
            timings.append(Timing(f"fine-tune ({finetune_steps} steps)", float(meta.get("train_seconds", 0.0)),
                                  (Path(source) / "meta.json").stat().st_mtime >= started_all))
    reports = []
    for name in targets:
        profile = load_profile(name)
        if budgets:
            profile = profile.with_budgets(**budgets)
        report = deploy(source, profile, work / f"deploy-{name}", options=options, force=force, log=log)
        log(f"{name}: report at {report}")
        reports.append(report)
        if timings is not None:
            timings += stage_timings(work / f"deploy-{name}", name, since=started_all)
    return reports


@dataclass(frozen=True)
class Timing:
    """One line of "where the time went": seconds, and whether they were spent in this run (else: cached, and the
    seconds are what computing it took when it was made)."""

    label: str
    seconds: float
    this_run: bool


def stage_timings(deploy_dir: Path, target: str, *, since: float) -> list[Timing]:
    """A deploy's stage seconds from its manifest; a stage that started before ``since`` (a wall-clock time) was
    reused from an earlier run."""
    try:
        stages = load_manifest(deploy_dir).get("stages", {})
    except (CheckpointError, OSError, ValueError):
        return []
    return [Timing(f"{target}: {stage}", float(entry["seconds"]), float(entry.get("started", 0)) >= since)
            for stage in STAGES if isinstance(entry := stages.get(stage), dict) and "seconds" in entry]


def format_timings(timings: list[Timing]) -> str:
    """The table ``amoeba demo`` ends with."""
    spent = sum(t.seconds for t in timings if t.this_run)
    lines = ["where the time went (this run; cached stages show what computing them took):"]
    lines += [f"  {t.label:<32} {t.seconds:>9.1f} s{'' if t.this_run else '  (cached)'}" for t in timings]
    lines.append(f"  {'total this run':<32} {spent:>9.1f} s")
    return "\n".join(lines)


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
