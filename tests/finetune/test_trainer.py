"""End-to-end runs on a tiny model: DDP equivalence, SIGKILL + resume, bad inputs never touch checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amoeba_export.artifacts import file_inventory
from amoeba_export.cli import main
from amoeba_export.finetune.checkpoint import latest_checkpoint
from amoeba_export.testing import TEXT

COMMON = ["--seq-len", "16", "--lr", "1e-2", "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(TEXT)
    return p


def _cli(plan, out, data, *extra) -> list[str]:
    return ["train", "--plan", str(plan), "--out", str(out), "--data", str(data), *COMMON, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "smol.safetensors"))


def _initial_weights(plan_dir) -> dict[str, torch.Tensor]:
    from amoeba_export.finetune.config import SMoLConfig
    from amoeba_export.finetune.model import SMoLModel
    from amoeba_export.plan import load_elastic

    elastic, _ = load_elastic(plan_dir)
    return SMoLModel(elastic, SMoLConfig(), seed=0).trainable_state()


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_plan_mean, text_file, tmp_path,
                                                                    one_thread):
    # Mean compensation here: data parallelism does not depend on it, and the least-squares refit gives the LoRA
    # columns of removed channels tiny, non-zero gradients whose last bits (one batch of 2 vs two of 1) Adam turns
    # into whole steps — measured 3.4e-3 of the update instead of < 1e-4, noise that would hide a real DDP bug.
    tiny_plan = tiny_plan_mean
    assert main(_cli(tiny_plan, tmp_path / "one", text_file, "--steps", "2", "--batch-size", "2")) == 0
    cmd = [sys.executable, "-m", "amoeba_export.cli",
           *_cli(tiny_plan, tmp_path / "two", text_file, "--steps", "2", "--batch-size", "1", "--num-processes", "2")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((latest_checkpoint(tmp_path / "two") / "state.json").read_text())
    digests = state["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both replicas hold identical weights
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    init = _initial_weights(tiny_plan)
    # Compare the updates: Adam turns last-bit differences of near-zero gradients (summation order of
    # two half batches vs one batch) into small step differences, so the tolerance is relative to the step.
    diff = sum(float(((one[k] - two[k]) ** 2).sum()) for k in one) ** 0.5
    step = sum(float(((one[k] - init[k]) ** 2).sum()) for k in one) ** 0.5
    assert step > 1e-3  # training moved the adapters
    assert diff / step < 1e-4, diff / step
    for k in one:
        assert float((one[k] - two[k]).norm()) <= 1e-3 * float((one[k] - init[k]).norm()) + 1e-9, k


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_plan, text_file, tmp_path, one_thread):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "amoeba_export.cli",
           *_cli(tiny_plan, run, text_file, "--steps", "100000", "--save-every", "2")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while latest_checkpoint(run) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (run / "meta.json").exists()  # the killed run is not mistaken for a finished one
    done = int(latest_checkpoint(run).name.split("-")[1])
    total = done + 3
    assert main(_cli(tiny_plan, run, text_file, "--steps", str(total), "--save-every", "2", "--resume")) == 0
    assert main(_cli(tiny_plan, tmp_path / "straight", text_file, "--steps", str(total), "--save-every", "2")) == 0
    resumed, straight = _weights(run), _weights(tmp_path / "straight")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, total + 1))  # the log has each step once


def test_bad_data_or_incompatible_checkpoint_never_touch_the_last_checkpoint(tiny_plan, text_file, tmp_path,
                                                                             one_thread, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert main(_cli(tiny_plan, run, data, "--steps", "2", "--save-every", "1")) == 0
    ckpt = latest_checkpoint(run)
    before = file_inventory(run)

    # An incompatible checkpoint (another LoRA rank): a clear error, exit 2.
    assert main(_cli(tiny_plan, run, data, "--steps", "4", "--rank", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "incompatible" in err and "smol.rank" in err
    assert file_inventory(run) == before
    # The data file went bad after the checkpoint was written.
    data.write_bytes(b"\xff\xfe not utf-8")
    assert main(_cli(tiny_plan, run, data, "--steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err
    assert file_inventory(run) == before and latest_checkpoint(run) == ckpt

    # A fresh run with a bad Alpaca file writes nothing at all.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3}\n')
    assert main(_cli(tiny_plan, tmp_path / "fresh", bad, "--steps", "1")) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()

    # Without --resume/--force an existing run is never replaced.
    assert main(_cli(tiny_plan, run, text_file, "--steps", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    assert file_inventory(run) == before


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(tiny_plan, text_file, tmp_path,
                                                                          one_thread):
    run = tmp_path / "early"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 3.')  # what a run killed in its first step leaves
    assert main(_cli(tiny_plan, run, text_file, "--steps", "2", "--save-every", "1", "--resume")) == 0
    assert (run / "meta.json").is_file() and latest_checkpoint(run) is not None
    log = (run / "log.jsonl").read_text()  # the torn line of the stopped run is gone
    assert [json.loads(line)["step"] for line in log.splitlines()] == [1, 2]
