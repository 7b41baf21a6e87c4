"""Whether bench figures can be trusted: machine-load accounting and the verdict (synthetic samples, plus one
real busy-process check that only asserts what the counters must show, never a speed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from amoeba_export.benchmark import load
from amoeba_export.benchmark.load import Sample, between, judge

TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def _pair(*, wall: float, others_s: float, ours_s: float, steal_s: float = 0.0):
    """Two samples ``wall`` seconds apart with other processes busy ``others_s`` CPU-seconds, the worker
    ``ours_s`` and the hypervisor stealing ``steal_s``."""
    total = int(wall * CPUS * TICK)
    before = Sample(wall=0.0, busy=0, steal=0, total=1000, children_cpu=0.0, loadavg=0.1)
    after = Sample(wall=wall, busy=int((others_s + ours_s) * TICK), steal=int(steal_s * TICK),
                   total=1000 + total, children_cpu=ours_s, loadavg=1.5)
    return before, after


def test_idle_machine_is_trusted():
    got = between(*_pair(wall=10.0, others_s=0.1, ours_s=9.0))
    assert got["other_cpu"] == pytest.approx(0.1 / (10.0 * CPUS), abs=2 / (TICK * 10 * CPUS))
    assert judge([got, got], spread=0.05) == {"reliable": True, "why": [], "measured": True}


def test_busy_machine_steal_and_disagreeing_repeats_are_named():
    busy = between(*_pair(wall=10.0, others_s=10.0 * CPUS * 0.5, ours_s=5.0))
    assert busy["other_cpu"] == pytest.approx(0.5, abs=0.01)
    verdict = judge([None, busy], spread=0.05)
    assert not verdict["reliable"] and "other processes used 50%" in verdict["why"][0]
    stolen = between(*_pair(wall=10.0, others_s=0.0, ours_s=5.0, steal_s=10.0 * CPUS * 0.2))
    assert "stole 20%" in judge([stolen], spread=0.0)["why"][0]
    assert judge([None], spread=0.4) == {"reliable": False, "why": ["repeats differ by 40% (limit 15%)"],
                                         "measured": False}


def test_the_workers_own_cpu_is_not_counted_as_other_load():
    got = between(*_pair(wall=4.0, others_s=0.0, ours_s=4.0 * CPUS))  # the worker used every core
    assert got["other_cpu"] == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the counters are Linux's /proc/stat")
def test_a_busy_process_shows_up_in_the_counters():
    """Real counters: a process spinning one core for the whole interval is ≥ most of 1/CPUS of the machine."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        before = load.sample()
        time.sleep(2.0)
        got = between(before, load.sample())
    finally:
        spin.kill()
        spin.wait()
    assert got is not None and got["other_cpu"] >= 0.5 / CPUS
