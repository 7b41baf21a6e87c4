"""Stage identity by content (issue 13, item 8): a plan, subnet and artifact are known by what they hold, so
re-planning into the same folder with other options misses every cache keyed downstream of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from amoeba_export.artifacts import read_meta
from amoeba_export.cli import main
from amoeba_export.identity import checksums, content_identity, stage_identity
from amoeba_export.plan import Plan


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AMOEBA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _replan(source: Plan, out: Path, **config) -> str:
    """Write ``source`` with other config values into ``out`` (as `amoeba plan --force` would); its identity."""
    dataclasses.replace(source, config=dataclasses.replace(source.config, **config)).save(out, force=True)
    return stage_identity(out)


def test_a_plan_is_known_by_its_content_not_its_path(tiny_plan_dir, tmp_path):
    plan = Plan.load(tiny_plan_dir)
    plan.save(tmp_path / "a")
    plan.save(tmp_path / "b")
    meta = read_meta(tmp_path / "a")
    # Derived from the checksums recorded when the files were written, not from re-reading them.
    assert meta["identity"] == content_identity("plan", meta["files"], model_dir=plan.model_dir)
    assert set(checksums(meta["files"])) >= {"plan.json", "width.safetensors"}
    assert stage_identity(tmp_path / "a") == stage_identity(tmp_path / "b")
    assert _replan(plan, tmp_path / "b", round_to=16) != stage_identity(tmp_path / "a")


def test_replanning_the_same_folder_with_other_options_misses_every_cache(tiny_plan_dir, tmp_path, cache):
    from amoeba_export.deploy.calibrate import calibration_key
    from amoeba_export.deploy.pipeline import DeployOptions, request_key
    from amoeba_export.deploy.search import PerplexityCache
    from amoeba_export.targets import load_profile

    plan, out = Plan.load(tiny_plan_dir), tmp_path / "plan"
    first = _replan(plan, out, round_to=8)
    shape = plan.shape(6, 0.5)
    PerplexityCache(first, 64, 32).put(shape, 123.0)
    assert PerplexityCache(stage_identity(out), 64, 32).get(shape) == 123.0  # same content: a hit

    second = _replan(plan, out, compensate="mean")
    assert second != first
    assert PerplexityCache(second, 64, 32).get(shape) is None
    assert calibration_key(first, "gguf", "Q8_0", {}, 2, [shape]) != calibration_key(second, "gguf", "Q8_0", {}, 2,
                                                                                      [shape])
    profile, opts = load_profile("laptop"), DeployOptions()
    assert request_key(first, profile, opts) != request_key(second, profile, opts)


def test_a_deploy_of_a_replanned_source_redoes_every_stage(tiny_plan_dir, tmp_path, cache):
    from amoeba_export.artifacts import write_meta
    from amoeba_export.deploy.pipeline import Deployment, stage_dir
    from amoeba_export.errors import OutputExistsError
    from amoeba_export.targets import load_profile

    plan, source, out = Plan.load(tiny_plan_dir), tmp_path / "plan", tmp_path / "deploy"
    _replan(plan, source, round_to=8)
    first = Deployment(source, load_profile("laptop"), out, log=lambda _: None)
    first._save_manifest()
    stage_dir(out, "search").mkdir()
    write_meta(stage_dir(out, "search"), {"kind": "deploy_search"})  # a finished stage of that request

    Deployment(source, load_profile("laptop"), out, log=lambda _: None)  # unchanged: the stage is kept
    assert (stage_dir(out, "search") / "meta.json").is_file()
    _replan(plan, source, round_to=16)
    lines: list[str] = []
    Deployment(source, load_profile("laptop"), out, log=lines.append)
    assert not stage_dir(out, "search").exists() and "changed since" in lines[0]
    # Another target is another request: still refused without --force.
    Deployment(source, load_profile("laptop"), out, log=lambda _: None)._save_manifest()
    with pytest.raises(OutputExistsError, match="another request"):
        Deployment(source, load_profile("android-8gb"), out, log=lambda _: None)


def test_subnet_and_artifact_identities_follow_their_plan(tiny_plan_dir, tmp_path, capsys):
    from amoeba_export.backends import get_backend

    plan, source = Plan.load(tiny_plan_dir), tmp_path / "plan"
    ids: dict[str, list[str]] = {"plan": [], "subnet": [], "artifact": []}
    for round_to in (8, 16):
        ids["plan"].append(_replan(plan, source, round_to=round_to))
        assert main(["extract", str(source), "--depth", "6", "--width", "0.5", "--out", str(tmp_path / "sub"),
                     "--force"]) == 0
        assert read_meta(tmp_path / "sub")["source_identity"] == ids["plan"][-1]
        ids["subnet"].append(stage_identity(tmp_path / "sub"))
        artifact = get_backend("pytorch").export(tmp_path / "sub", tmp_path / "art", "F32", force=True)
        assert artifact.meta["source_identity"] == ids["subnet"][-1]
        ids["artifact"].append(stage_identity(artifact.path))
    capsys.readouterr()
    for stage, (a, b) in ids.items():
        assert a != b, stage  # a changed plan changes everything downstream of it
