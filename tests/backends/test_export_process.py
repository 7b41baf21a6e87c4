"""An export in a child process: the same artifact as in-process, errors back as their own class, crashes named."""

import pytest

from amoeba_export.backends import get_backend
from amoeba_export.backends.export_process import export_in_child
from amoeba_export.backends.isolation import FAULT_ENV
from amoeba_export.errors import CheckpointError, OutputExistsError, RuntimeCrashError


def test_child_export_equals_the_in_process_one(tiny_dir, tmp_path):
    child = export_in_child("gguf", tiny_dir, tmp_path / "child", "F32", threads=1)
    here = get_backend("gguf").export(tiny_dir, tmp_path / "here", "F32", threads=1)
    assert child.path == tmp_path / "child" and child.quant == "F32"
    assert child.model_file.read_bytes() == here.model_file.read_bytes()
    child.verify(checksums=True)


def test_errors_come_back_as_their_own_class_with_the_fix(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError) as err:
        export_in_child("gguf", tmp_path / "missing", tmp_path / "out", "F32")
    assert err.value.fix and str(err.value).endswith(f"({err.value.fix})")
    export_in_child("gguf", tiny_dir, tmp_path / "twice", "F32")
    with pytest.raises(OutputExistsError, match="--force"):
        export_in_child("gguf", tiny_dir, tmp_path / "twice", "F32")


def test_a_crash_in_the_child_is_one_error_naming_the_signal(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "SIGSEGV")
    with pytest.raises(RuntimeCrashError, match=r"the gguf/F32 export of .* crashed \(SIGSEGV\)"):
        export_in_child("gguf", tiny_dir, tmp_path / "out", "F32")
    assert not (tmp_path / "out").exists()
