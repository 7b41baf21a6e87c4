"""`amoeba demo` ends with where the time went: stage seconds from each deploy's manifest, this run vs cached."""

from __future__ import annotations

import json

from amoeba_export.deploy.demo import Timing, format_timings, stage_timings
from amoeba_export.deploy.pipeline import MANIFEST


def test_stage_timings_split_this_run_from_cached(tmp_path):
    stages = {"search": {"status": "done", "seconds": 70.0, "started": 100.0},
              "extract": {"status": "done", "seconds": 1.7, "started": 200.0},
              "export": {"status": "failed", "seconds": 9.4, "started": 300.0},
              "validate": {"status": "running", "started": 400.0}}  # no seconds yet: not listed
    (tmp_path / MANIFEST).write_text(json.dumps({"stages": stages}))
    got = stage_timings(tmp_path, "laptop", since=150.0)
    assert got == [Timing("laptop: search", 70.0, False), Timing("laptop: extract", 1.7, True),
                   Timing("laptop: export", 9.4, True)]
    assert stage_timings(tmp_path / "missing", "laptop", since=0.0) == []
    table = format_timings([Timing("plan + subnet table", 12.0, True), *got])
    lines = table.splitlines()
    assert lines[0].startswith("where the time went")
    assert "laptop: search" in lines[2] and lines[2].endswith("(cached)")
    assert "laptop: extract" in lines[3] and not lines[3].endswith("(cached)")
    assert lines[-1].split()[-2] == "23.1"  # 12 + 1.7 + 9.4: cached seconds are not this run's


def test_amoeba_demo_prints_the_table_last(monkeypatch, capsys, tmp_path):
    import amoeba_export.demo as demo
    import amoeba_export.deploy.demo as deploy_demo
    from amoeba_export.cli import main

    monkeypatch.setattr(demo, "run_demo", lambda model, eval_tokens: [])
    monkeypatch.setattr(demo, "format_table", lambda rows: "TABLE")

    def fake_deploy(model, *, targets, finetune_steps, timings):
        timings.append(Timing("fine-tune (3 steps)", 5.0, True))
        timings.append(Timing("laptop: export", 9.0, False))
        return [tmp_path / "report.html"]

    monkeypatch.setattr(deploy_demo, "deploy_demo", fake_deploy)
    assert main(["demo", "--deploy", "laptop", "--finetune-steps", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-5].startswith("where the time went")
    assert [ln.split()[0] for ln in out[-4:]] == ["plan", "fine-tune", "laptop:", "total"]
    assert out[-2].endswith("(cached)")
