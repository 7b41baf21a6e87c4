"""Deploy end to end on a tiny model (GGUF Q8_0): budgets, resume after a kill, the report in a browser."""

import json
import shutil
import subprocess

import pytest

from amoeba_export.deploy import STAGES, deploy, load_manifest, search, stage_dir
from amoeba_export.deploy.pipeline import Deployment
from amoeba_export.errors import BudgetError


class Killed(BaseException):
    """Stands in for SIGKILL/Ctrl-C in the middle of a stage."""


@pytest.fixture(scope="module")
def finished(deploy_plan_dir, tiny_profile, fast_options, tmp_path_factory):
    """A deploy killed during validation, then resumed: (out folder, calls made by the resumed run)."""
    out = tmp_path_factory.mktemp("dep") / "out"
    profile = tiny_profile(max_file_mb=0.45)
    original = Deployment._validate

    def killed(self, folder):
        raise Killed()

    Deployment._validate = killed
    try:
        with pytest.raises(Killed):
            deploy(deploy_plan_dir, profile, out, options=fast_options, log=lambda s: None)
    finally:
        Deployment._validate = original
    before = {s: (stage_dir(out, s) / "meta.json").stat().st_mtime_ns for s in ("search", "extract", "export")}
    manifest = load_manifest(out)
    assert manifest["stages"]["validate"]["status"] == "failed"
    assert not stage_dir(out, "validate").exists()

    calls = []
    for stage in ("search", "extract", "export"):
        def spy(self, folder, stage=stage):
            calls.append(stage)
            raise AssertionError(f"{stage} was redone")
        setattr(Deployment, f"_{stage}", spy)
    try:
        report = deploy(deploy_plan_dir, profile, out, options=fast_options, log=lambda s: None)
    finally:
        import importlib

        import amoeba_export.deploy.pipeline as pipeline
        importlib.reload(pipeline)
    after = {s: (stage_dir(out, s) / "meta.json").stat().st_mtime_ns for s in before}
    return out, report, calls, before == after


def test_killed_deploy_resumes_without_redoing_stages(finished):
    out, report, calls, untouched = finished
    assert calls == [] and untouched
    manifest = load_manifest(out)
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "done"] == list(STAGES)
    for stage in STAGES:
        assert json.loads((stage_dir(out, stage) / "meta.json").read_text())
    assert report.is_file() and (report.parent / "report.md").is_file()


def test_chosen_shape_meets_budget_and_size_prediction(finished):
    out, *_ = finished
    s = load_manifest(out)["stages"]["report"]
    assert s["file_bytes"] <= 0.45e6  # the real file meets the budget the prediction was checked against
    assert s["size_pred_err"] < 0.01, s
    chosen = load_manifest(out)["stages"]["search"]["chosen"]
    result = json.loads((stage_dir(out, "search") / "search.json").read_text())
    feasible = [c for c in result["candidates"] if not c["breaks"]]
    assert chosen == min(feasible, key=lambda c: c["ppl"])["name"]
    assert any(c["breaks"] for c in result["candidates"])  # the budget did constrain the choice
    # The speed model was fitted on the three probes (prefixes of the widest/narrowest candidates), not candidates.
    points = result["calibration"]["points"]
    assert [p["layers"] for p in points][:2] == [1, 6] and len(points) == 3
    assert all(p["shape"].startswith("probe-") for p in points)


def test_impossible_budget_names_closest_shape_and_budget(deploy_plan_dir, tiny_profile, fast_options, finished):
    profile = tiny_profile(max_file_mb=0.01)
    result = search(deploy_plan_dir, profile, eval_tokens=fast_options.eval_tokens, seq_len=fast_options.seq_len,
                    calibration_repeats=1, progress=False)  # ppl and calibration are cached by the deploy
    smallest = min(result.candidates, key=lambda c: c.file_bytes)
    assert result.best is None and result.candidates[result.closest].name == smallest.name
    with pytest.raises(BudgetError) as info:
        deploy(deploy_plan_dir, profile, finished[0].parent / "impossible", options=fast_options,
               log=lambda s: None)
    message = str(info.value)
    assert smallest.name in message and "max_file_mb" in message and "limit 0.01" in message


def test_report_renders_in_headless_chromium(finished, tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    browser = shutil.which("chromium")
    assert browser, "Chromium is missing: apt-get install -y chromium"
    report = finished[1]
    html = report.read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html.split("<body>")[1]
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for title in ("Stage timings", "Validation against the PyTorch subnet", "Benchmark", "Candidates"):
        assert title in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1100,1400", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    # The embedded plot is drawn: a good share of the page is neither white nor near-white.
    assert np.mean(pixels.min(axis=-1) < 0.8) > 0.02
    shutil.copy(shot, report.parent.parent / "screenshot.png")
