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
    assert (by["android-8gb"].backend, by["android-8gb"].quant) == ("executorch", "8da4w-attn-gptq")
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


GOOD = {"version": 1, "name": "box", "backend": "executorch", "quant": "8da4w-attn", "threads": 2,
        "context_length": 512, "budgets": {"max_file_mb": 400, "max_memory_mb": 2048, "min_decode_tok_s": 8},
        "export": {"max_context": 512}, "search": {"width_modes": ["global"], "max_candidates": 40}}


def _toml(data: dict) -> str:
    def value(v):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


@pytest.mark.parametrize("edit, needle", [
    ({"budgets": {"max_file_mb": float("nan")}}, "budgets.max_file_mb"),  # NaN used to remove the limit
    ({"budgets": {"max_file_mb": float("inf")}}, "budgets.max_file_mb"),
    ({"budgets": {"max_memory_mb": 1e308}}, "budgets.max_memory_mb"),
    ({"threads": 100000}, "threads must be an integer in 1..1024"),
    ({"context_length": 100_000_000_000}, "context_length"),
    ({"export": {"max_context": -5}}, "[export] max_context"),
    ({"export": {"max_context": 512, "colour": 1}}, "[export] unknown ExecuTorch export option 'colour'"),
    ({"backend": ["gguf"]}, "backend must be a string"),
    ({"quant": 4}, "quant must be a string"),
])
def test_out_of_range_values_are_refused_on_load(tmp_path, edit, needle):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for key, value in edit.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in ("budgets", "export") else value
    path = tmp_path / "p.toml"
    path.write_text(_toml(data))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_good_profile_round_trips_and_binary_file_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(_toml(GOOD))
    assert load_profile(path).budgets.max_file_mb == 400
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_profile(path)


def test_mutated_profiles_give_an_error_or_a_valid_profile_never_a_crash(tmp_path):
    """Seeded mutations (type swaps, NaN/inf, huge and negative numbers, lists for scalars, dropped keys)."""
    import random

    rng = random.Random(0)
    weird = [float("nan"), float("inf"), -1, 0, 10**12, 1e308, "x", ["gguf"], True, 3.5, ""]
    path = tmp_path / "p.toml"
    outcomes = {"error": 0, "ok": 0}
    for _ in range(200):
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(data))
            if isinstance(data[key], dict) and data[key] and rng.random() < 0.7:
                sub = rng.choice(list(data[key]))
                data[key][sub] = rng.choice(weird)
            elif rng.random() < 0.2:
                del data[key]
            else:
                data[key] = rng.choice(weird)
        path.write_text(_toml(data))
        try:
            p = load_profile(path)
        except ConfigError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        for _, v in p.budgets.items():  # whatever loads is usable: finite positive budgets, sane ranges
            assert 0 < v < float("inf")
        assert 1 <= p.threads <= 1024 and 16 <= p.context_length <= 1 << 20
    assert outcomes["error"] > 100  # the mutations really are mostly invalid
