"""Artifact folders are trusted only when their files match what meta.json records."""

from __future__ import annotations

import json

import pytest

from amoeba_export.artifacts import atomic_dir, file_inventory, member_path, verify_files, write_meta
from amoeba_export.backends.base import Artifact
from amoeba_export.benchmark import bench_artifact
from amoeba_export.errors import CheckpointError


@pytest.fixture
def artifact(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(b"weights" * 100)
        (tmp / "tokenizer.json").write_text("{}")
        write_meta(tmp, {"kind": "export", "version": 1, "backend": "gguf", "quant": "Q8_0", "model_file": "model.bin",
                         "files": file_inventory(tmp)})
    return out


def test_intact_folder_verifies(artifact):
    Artifact.open(artifact).verify()


def test_same_size_tampering_is_caught_by_checksum_only(artifact):
    (artifact / "model.bin").write_bytes(b"WEIGHTS" * 100)
    a = Artifact.open(artifact)
    a.verify(checksums=False)  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match="model.bin does not match its recorded sha256"):
        a.verify()


def test_every_problem_is_listed_at_once(artifact):
    (artifact / "model.bin").write_bytes(b"short")
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as info:
        Artifact.open(artifact).verify()
    assert "model.bin is truncated or altered (5 bytes" in str(info.value)
    assert "tokenizer.json is missing" in str(info.value)


@pytest.mark.parametrize("name", ["../../x.gguf", "/etc/passwd", "sub/../../x"])
def test_paths_leaving_the_folder_are_refused(artifact, name):
    meta = json.loads((artifact / "meta.json").read_text())
    meta["model_file"] = name
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside the folder"):
        _ = Artifact.open(artifact).model_file
    with pytest.raises(CheckpointError, match="outside the folder"):
        verify_files(artifact, {name: {"bytes": 1}})
    assert member_path(artifact, "model.bin") == artifact / "model.bin"


def test_bench_refuses_an_altered_artifact_before_running_it(artifact):
    (artifact / "model.bin").write_bytes(b"WEIGHTS" * 100)
    with pytest.raises(CheckpointError, match="sha256"):
        bench_artifact(artifact, repeats=1, progress=False)


def test_output_under_a_file_is_one_clear_error(tmp_path):
    from amoeba_export.errors import OutputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create .*file/out"):
        with atomic_dir(tmp_path / "file" / "out"):
            pass


def test_full_disk_names_the_folder_and_leaves_nothing(tmp_path):
    import errno

    from amoeba_export.errors import OutputError

    with pytest.raises(OutputError, match=r"no space left on the device writing .*out: 5 bytes were written"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_bytes(b"12345")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_meta_without_backend_is_not_an_artifact(artifact):
    meta = json.loads((artifact / "meta.json").read_text())
    del meta["backend"]
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="backend must be a non-empty string"):
        Artifact.open(artifact)


@pytest.mark.parametrize("edit, needle", [
    ({"num_hidden_layers": "four"}, "num_hidden_layers must be a positive integer, got 'four'"),
    ({"hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},
     "hidden_size (100) is not a multiple of num_attention_heads (3)"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
    (["a", "list"], "holds a JSON list"),
])
def test_bad_config_json_is_named_before_transformers_reads_it(tiny_dir, tmp_path, capsys, edit, needle):
    import shutil

    from amoeba_export.cli import main

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {**cfg, **edit} if isinstance(edit, dict) else edit
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(folder)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_killed_runs_leftovers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "big").write_bytes(b"x" * 10)
    live = tmp_path / f".out.tmp-{os.getppid()}-def"  # the test runner's parent: alive
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "f").read_text() == "1"


def test_folders_and_json_follow_the_umask(tmp_path):
    import os

    from amoeba_export.artifacts import write_json

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json(tmp / "a.json", {"x": 1})
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "out" / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.json"]  # no temporary file left


def test_pickle_weights_are_never_loaded(tiny_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from amoeba_export.modelio import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").rename(folder / "stray.safetensors")
    with pytest.raises(CheckpointError):
        load_model(folder)
