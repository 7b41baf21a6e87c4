"""Native runtimes run in a child process: a crash is one clear error naming the file, quant and signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from amoeba_export.backends import get_backend
from amoeba_export.backends.gguf import selfcheck
from amoeba_export.backends.isolation import FAULT_ENV, IsolatedRunner
from amoeba_export.benchmark import bench_artifact
from amoeba_export.errors import RuntimeCrashError
from amoeba_export.testing import tiny_llama

IDS = [3, 17, 42, 99, 150, 7, 260, 31]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("iso") / "tiny"
    tiny_llama(path, layers=2)
    return path


@pytest.fixture(scope="module")
def q8(tiny, tmp_path_factory):
    return get_backend("gguf").export(tiny, tmp_path_factory.mktemp("q8") / "a", "Q8_0", progress=False)


def test_isolated_runner_matches_in_process(q8):
    gguf = get_backend("gguf")
    with gguf.load(q8, threads=1, isolated=False) as local, gguf.load(q8, threads=1) as child:
        assert isinstance(child, IsolatedRunner) and child.pid != os.getpid()
        np.testing.assert_array_equal(child.logits(IDS), local.logits(IDS))
        assert child.generate(IDS, 6) == local.generate(IDS, 6)
        assert child.tokenize("the cat sat") == local.tokenize("the cat sat")
        assert child.vocab_size == local.vocab_size


def test_crash_in_the_child_is_one_error_naming_file_quant_and_signal(q8):
    runner = get_backend("gguf").load(q8, threads=1)
    runner.logits(IDS)  # alive
    os.kill(runner.pid, signal.SIGSEGV)
    with pytest.raises(RuntimeCrashError) as info:
        runner.logits(IDS)
    message = str(info.value)
    assert message.startswith("llama.cpp crashed (SIGSEGV) running ")
    assert str(q8.model_file) in message and "gguf/Q8_0" in message and "rebuild" in message
    assert info.value.exit_code == 4
    runner.close()


def test_cli_reports_a_runtime_crash_in_one_line(tiny, q8, tmp_path):
    selfcheck.ensure_llama_cpp_works()  # cache the verdict: the injected fault must hit the user's file
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    env = dict(os.environ, **{FAULT_ENV: "SIGSEGV"})
    cmd = [sys.executable, "-m", "amoeba_export.cli", "validate", str(q8.path), "--text-file", str(text),
           "--seq-len", "32", "--max-tokens", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: llama.cpp crashed (SIGSEGV) running "), proc.stderr
    assert str(q8.model_file) in lines[-1] and "gguf/Q8_0" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_bench_names_the_signal_not_the_runtimes_chatter(q8, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "SIGABRT")
    with pytest.raises(RuntimeCrashError, match=r"llama.cpp crashed \(SIGABRT\) running .*model-Q8_0.gguf "
                                                r"\(gguf/Q8_0\)"):
        bench_artifact(q8.path, threads=1, repeats=1, new_tokens=4, prompt_tokens=4, progress=False,
                       bandwidth={"copy_bandwidth_gbs": 1.0})
