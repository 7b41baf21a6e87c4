"""The benchmark harness: fresh processes, medians and spreads, the bandwidth bound (no timed assertions)."""

from __future__ import annotations

import os

import pytest

from amoeba_export.backends import get_backend
from amoeba_export.benchmark import bench_artifact, format_table
from amoeba_export.benchmark.harness import measure_bandwidth, summarize
from amoeba_export.errors import BackendError, CheckpointError
from amoeba_export.testing import tiny_llama


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tiny_llama(root / "hf")
    return get_backend("pytorch").export(root / "hf", root / "pt", "F32")


def test_bench_runs_each_repeat_in_a_fresh_process(artifact):
    bandwidth = measure_bandwidth(1)
    result = bench_artifact(artifact.path, threads=1, prompt_tokens=16, new_tokens=4, repeats=2,
                            bandwidth=bandwidth, progress=False)
    pids = result["pids"]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for name, stats in result["metrics"].items():
        assert len(stats["values"]) == 2, name
        assert stats["min"] <= stats["median"] <= stats["max"], name
        assert stats["min"] > 0 or name == "rss_before_load_gb", name
    assert result["model_bytes"] == artifact.size_bytes and result["threads"] == 1
    assert result["bandwidth_bound_tok_s"] == pytest.approx(bandwidth["copy_bandwidth_gbs"] * 1e9
                                                            / result["bytes_per_token"])
    assert result["bound_fraction"] == pytest.approx(result["metrics"]["decode_tok_s"]["median"]
                                                     / result["bandwidth_bound_tok_s"])
    assert len(result["load"]) == 2 and set(result["trust"]) == {"reliable", "why", "measured"}
    assert result["trust"]["reliable"] is not bool(result["trust"]["why"])
    table = format_table(result)
    assert ("UNRELIABLE" in table) is not result["trust"]["reliable"]
    for word in ("decode_tok_s", "ttft_s", "bound fraction", "peak_rss_gb"):
        assert word in table


def test_summary_statistics():
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["spread"]) == (2.0, 1.0, 3.0, 1.0)


def test_bad_inputs(artifact, tmp_path):
    with pytest.raises(CheckpointError, match="meta.json"):
        bench_artifact(tmp_path)
    with pytest.raises(BackendError, match="new_tokens"):
        bench_artifact(artifact.path, new_tokens=1)
