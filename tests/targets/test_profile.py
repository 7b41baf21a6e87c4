import pytest

from amoeba_export.errors import ConfigError
from amoeba_export.targets import load_profile, shipped_names, shipped_profiles

BROKEN = """
version = 1
name = ""
backend = "gguf"
quant = "Q3_X"
threads = 0
context_length = "long"
colour = "red"

[budgets]
max_file_mb = -5
min_decode_tok_s = "fast"
max_ram = 3

[search]
width_modes = ["sideways"]
"""


def test_shipped_profiles_cover_the_required_devices():
    names = set(shipped_names())
    assert {"android-8gb", "small-phone", "laptop", "raspberry-pi-5", "desktop-cpu"} <= names
    by = {p.name: p for p in shipped_profiles()}
    assert (by["android-8gb"].backend, by["android-8gb"].quant) == ("executorch", "8da4w-attn")
    assert (by["laptop"].backend, by["laptop"].quant) == ("gguf", "Q4_K_M")
    assert (by["raspberry-pi-5"].quant, by["raspberry-pi-5"].threads) == ("Q4_0", 4)
    assert by["desktop-cpu"].backend == "onnx" and by["desktop-cpu"].quant in ("int8", "int4")
    assert by["small-phone"].budgets.max_file_mb < by["android-8gb"].budgets.max_file_mb


def test_broken_profile_lists_every_problem(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    problems = "\n".join(info.value.problems)
    for needle in ("colour", "name is missing", "Q3_X", "threads", "context_length", "max_file_mb",
                   "min_decode_tok_s", "max_ram", "width_modes"):
        assert needle in problems, needle
    assert len(info.value.problems) == 9


def test_user_profile_by_path_and_budget_override(tmp_path):
    path = tmp_path / "box.toml"
    path.write_text('name = "box"\nbackend = "gguf"\nquant = "q8_0"\n[budgets]\nmax_file_mb = 50\n')
    p = load_profile(path)
    assert p.quant == "Q8_0" and p.budgets.max_file_mb == 50 and p.budgets.min_decode_tok_s is None
    assert p.with_budgets(max_file_mb=20).budgets.max_file_mb == 20
    with pytest.raises(ConfigError, match="unknown budget"):
        p.with_budgets(max_disk=1)


def test_unknown_name_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="laptop"):
        load_profile("toaster")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(bad)


def test_targets_cli_lists_and_checks(tmp_path, capsys):
    from amoeba_export.cli import main

    assert main(["targets"]) == 0
    assert "android-8gb" in capsys.readouterr().out
    path = tmp_path / "mine.toml"
    path.write_text(BROKEN)
    assert main(["targets", str(path)]) == 2
    assert "9 problem(s)" in capsys.readouterr().err
