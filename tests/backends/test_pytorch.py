"""The PyTorch reference backend: export = copy + meta; the runner matches transformers exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amoeba_export.artifacts import read_meta
from amoeba_export.backends import get_backend
from amoeba_export.backends.base import Artifact
from amoeba_export.errors import BackendError, CheckpointError, OutputExistsError
from amoeba_export.testing import tiny_llama

IDS = [3, 17, 42, 99, 150, 7, 260, 31, 5, 77]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "hf"
    model = tiny_llama(path)
    return path, model


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "artifact"
    return get_backend("pytorch").export(tiny[0], out, "F32")


def test_export_writes_a_complete_artifact(tiny, artifact):
    meta = read_meta(artifact.path, kind="export")
    assert meta["backend"] == "pytorch" and meta["quant"] == "F32"
    assert set(meta["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert meta["model_bytes"] == (tiny[0] / "model.safetensors").stat().st_size
    # The config summary counts exactly the model's weights (the tiny model has no biases).
    params = sum(p.numel() for p in tiny[1].parameters())
    assert meta["shape"]["params"] == params
    assert meta["shape"]["q_heads"] == [4] * 4 and meta["shape"]["mlp"] == [128] * 4
    assert meta["source"]["hf_dir"] == str(tiny[0].resolve())
    for key in ("tools", "export_seconds", "export_peak_rss_gb", "notes", "bytes_per_token"):
        assert key in meta


def test_runner_logits_equal_transformers(tiny, artifact):
    backend = get_backend("pytorch")
    with backend.load(artifact) as runner:
        got = runner.logits(IDS)
        assert runner.vocab_size == 320
    with torch.no_grad():
        want = tiny[1](input_ids=torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cached_generation_matches_full_sequence_argmax(artifact):
    with get_backend("pytorch").load(artifact) as runner:
        new = runner.generate(IDS, 8)
        full = runner.logits(IDS + new[:-1])
        assert len(new) == 8
        assert new == [int(t) for t in full[len(IDS) - 1:].argmax(-1)]
        # Stop ids end generation right after the stop token.
        assert runner.generate(IDS, 8, stop_ids=[new[2]])[-1] == new[2]
        sampled = runner.generate(IDS, 8, temperature=1.0, seed=1)
        assert sampled == runner.generate(IDS, 8, temperature=1.0, seed=1)


def test_bad_inputs_give_clear_errors(tiny, artifact, tmp_path):
    backend = get_backend("pytorch")
    with pytest.raises(BackendError, match="unknown quant type 'Q4_0'.*supported are: F32"):
        backend.export(tiny[0], tmp_path / "x", "Q4_0")
    with pytest.raises(OutputExistsError, match="--force"):
        backend.export(tiny[0], artifact.path, "F32")
    with pytest.raises(CheckpointError, match="config.json"):
        backend.export(tmp_path, tmp_path / "y", "F32")
    with pytest.raises(BackendError, match="unknown backend 'nope'.*pytorch"):
        get_backend("nope")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_force_replaces_an_artifact(tiny, tmp_path):
    out = tmp_path / "a"
    first = get_backend("pytorch").export(tiny[0], out, "F32")
    again = get_backend("pytorch").export(tiny[0], out, "f32", force=True)
    assert again.quant == "F32" and Artifact.open(out).meta["files"] == first.meta["files"]
