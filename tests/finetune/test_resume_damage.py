"""`train --resume` over damaged checkpoints (issue 13): a truncated optimizer.pt, a garbled state.json or a torn
log line falls back to the previous complete checkpoint — to the same weights as an uninterrupted run — or,
with none left, ends in one `error:` line naming the bad file, exit 2, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amoeba_export.artifacts import file_inventory
from amoeba_export.cli import main
from amoeba_export.finetune.checkpoint import checkpoint_name, checkpoints_dir, list_checkpoints
from amoeba_export.testing import TEXT

COMMON = ["--seq-len", "16", "--lr", "1e-2", "--quiet", "--save-every", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(TEXT)
    return p


def _train(capsys, plan, out, data, steps: int, *extra: str) -> tuple[int, list[str]]:
    code = main(["train", "--plan", str(plan), "--out", str(out), "--data", str(data), *COMMON,
                 "--steps", str(steps), *extra])
    return code, capsys.readouterr().err.splitlines()


def _step(run: Path, step: int) -> Path:
    return checkpoints_dir(run) / checkpoint_name(step)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    path.write_text(path.read_text()[:-7] + "\x00{]")


@pytest.mark.parametrize("damage", ["optimizer", "state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, tiny_plan, text_file, tmp_path,
                                                                    one_thread, capsys):
    run = tmp_path / "run"
    assert _train(capsys, tiny_plan, run, text_file, 4)[0] == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    bad = _step(run, 4) / ("optimizer.pt" if damage == "optimizer" else "state.json")
    (_truncate if damage == "optimizer" else _garble)(bad)
    with open(run / "log.jsonl", "a") as fh:  # and a torn last log line, as a kill mid-write leaves
        fh.write('{"step": 5, "lr": 0.0')

    code, err = _train(capsys, tiny_plan, run, text_file, 6, "--resume")
    assert code == 0
    notice = [ln for ln in err if "damaged" in ln]
    assert len(notice) == 1 and bad.name in notice[0] and "resuming from step-00000002" in notice[0], err
    assert not [ln for ln in err if ln.startswith(("error:", "Traceback"))]

    assert main(["train", "--plan", str(tiny_plan), "--out", str(tmp_path / "straight"), "--data", str(text_file),
                 *COMMON, "--steps", "6"]) == 0
    resumed, straight = load_file(str(run / "smol.safetensors")), load_file(str(tmp_path / "straight" /
                                                                                    "smol.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    steps = [int(ln.split('"step": ')[1].split(",")[0]) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the torn line is gone and every step is logged once
    # The damaged checkpoint is moved out of the list, so pruning keeps the good ones.
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]


@pytest.mark.parametrize("damage", ["optimizer", "state", "rng"])
def test_a_damaged_only_checkpoint_is_one_error_naming_the_file(damage, tiny_plan, text_file, tmp_path, one_thread,
                                                                capsys):
    run = tmp_path / "run"
    assert _train(capsys, tiny_plan, run, text_file, 2)[0] == 0
    name = {"optimizer": "optimizer.pt", "state": "state.json", "rng": "rng-rank0.pt"}[damage]
    (_garble if damage == "state" else _truncate)(_step(run, 2) / name)
    before = file_inventory(run)

    code, err = _train(capsys, tiny_plan, run, text_file, 4, "--resume")
    errors = [ln for ln in err if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert name in errors[0] and "damaged" in errors[0] and "--force" in errors[0]
    assert not [ln for ln in err if "Traceback" in ln]
    assert file_inventory(run) == before  # nothing touched


def test_a_half_written_log_line_alone_resumes_from_the_latest(tiny_plan, text_file, tmp_path, one_thread,
                                                               capsys):
    run = tmp_path / "run"
    assert _train(capsys, tiny_plan, run, text_file, 2)[0] == 0
    shutil.copy(run / "log.jsonl", tmp_path / "log.before")
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": {"full": 3.')
    code, err = _train(capsys, tiny_plan, run, text_file, 3, "--resume")
    assert code == 0 and not [ln for ln in err if "damaged" in ln or ln.startswith("error:")], err
    lines = (run / "log.jsonl").read_text().splitlines()
    assert lines[:2] == (tmp_path / "log.before").read_text().splitlines() and '"step": 3' in lines[2]
    assert len(lines) == 3


def test_a_replanned_plan_is_refused_by_resume_and_extraction(tiny_plan, text_file, tmp_path, one_thread, capsys):
    """The adapters are tied to the plan's content: re-planning its folder must not be silently trained on or
    extracted from (identity by content, issue 13 item 8)."""
    import dataclasses

    from amoeba_export.plan import Plan

    plan_dir = tmp_path / "plan"
    shutil.copytree(tiny_plan, plan_dir)
    run = tmp_path / "run"
    assert _train(capsys, plan_dir, run, text_file, 2)[0] == 0
    plan = Plan.load(plan_dir)
    dataclasses.replace(plan, config=dataclasses.replace(plan.config, round_to=16)).save(plan_dir, force=True)

    code, err = _train(capsys, plan_dir, run, text_file, 4, "--resume")
    assert code == 2 and "re-computed since the checkpoint" in "".join(err), err
    code = main(["extract", str(run), "--depth", "4", "--width", "0.5", "--out", str(tmp_path / "sub")])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "re-computed after" in errors[0]
