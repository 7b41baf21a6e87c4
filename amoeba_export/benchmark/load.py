"""Whether a benchmark figure can be trusted: what else the machine did while each repeat ran.

A decode figure measured while other processes compete for the cores is not the runtime's speed: on a 2-core
machine with other jobs the same GGUF file decoded at 0.375 and at 11.7 tok/s. Each repeat is bracketed by two
samples of ``/proc/stat`` and of this process's children's CPU time, which give

* ``other_cpu``: the share of the machine's CPU time spent by processes other than the benchmark worker
  (0 = idle machine; 0.5 on a 2-core machine = another process kept one core busy throughout);
* ``steal``: the share a hypervisor gave to other guests (a busy cloud host);
* the 1-minute load average before and after.

:func:`judge` marks the figures unreliable when any repeat ran on a busy machine or the repeats disagree; the
bench reports why instead of a bare number. Linux only; elsewhere the samples are empty and nothing is judged.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Thresholds: another process using a fifth of the machine on average (on 2 cores: 40 % of one core) already
# changes decode speed by tens of percent; a hypervisor stealing 5 % of the time is a noisy neighbour; repeats
# more than 15 % apart (max − min over the median) disagree.
MAX_OTHER_CPU = 0.2
MAX_STEAL = 0.05
MAX_SPREAD = 0.15


@dataclass(frozen=True)
class Sample:
    """One reading: wall clock, /proc/stat jiffies (busy, steal, total) and children's CPU seconds."""

    wall: float
    busy: int
    steal: int
    total: int
    children_cpu: float
    loadavg: float


def sample() -> Sample | None:
    """This machine's counters now (None where /proc is not there)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        loadavg = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Sample(wall=time.monotonic(), busy=user + nice + system + irq + softirq, steal=steal, total=sum(fields),
                  children_cpu=usage.ru_utime + usage.ru_stime, loadavg=loadavg)


def between(before: Sample | None, after: Sample | None) -> dict[str, float] | None:
    """What the machine did between two samples, as shares of its CPU time (None when unknown)."""
    if before is None or after is None or after.total <= before.total:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    wall = max(after.wall - before.wall, 1e-9)
    ours = after.children_cpu - before.children_cpu  # the worker (and anything it spawned), in seconds
    others = max(0.0, (after.busy - before.busy) / tick - ours)
    return {"other_cpu": min(1.0, others / (wall * cpus)),
            "steal": (after.steal - before.steal) / (after.total - before.total),
            "loadavg_before": before.loadavg, "loadavg_after": after.loadavg}


def judge(loads: list[dict[str, float] | None], spread: float) -> dict[str, Any]:
    """``{"reliable": bool, "why": [...]}`` for repeats measured under ``loads`` whose key metric spread is
    ``spread`` ((max − min) / median)."""
    why = []
    known = [ld for ld in loads if ld is not None]
    if known:
        busiest = max(ld["other_cpu"] for ld in known)
        if busiest > MAX_OTHER_CPU:
            why.append(f"other processes used {busiest:.0%} of the machine's CPU during a repeat "
                       f"(limit {MAX_OTHER_CPU:.0%})")
        steal = max(ld["steal"] for ld in known)
        if steal > MAX_STEAL:
            why.append(f"the hypervisor stole {steal:.0%} of CPU time during a repeat (limit {MAX_STEAL:.0%})")
    if spread > MAX_SPREAD:
        why.append(f"repeats differ by {spread:.0%} (limit {MAX_SPREAD:.0%})")
    return {"reliable": not why, "why": why, "measured": bool(known)}
