"""Every bad input: one line naming the fix, non-zero exit."""

import pytest

from amoeba_export.cli import VERBS, main


def run(capsys, *argv):
    code = main(list(argv))
    # Progress bars share stderr; the error itself must be exactly one line.
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in ("plan", "extract", "train", "export", "validate", "bench", "deploy"):
        assert verb in out


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_is_quiet_and_imports_no_model_stack(verb):
    """A fresh `amoeba [VERB] --help` prints no warning line and imports neither torch nor transformers nor
    torchao: their import is what printed warnings and took seconds (a sys.modules check, not a timing)."""
    import subprocess
    import sys

    argv = ["--help"] if verb is None else [verb, "--help"]
    code = ("import sys, runpy; sys.argv = ['amoeba', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('amoeba_export.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('LOADED', *sorted(m for m in ('torch', 'transformers', 'torchao') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip() == "", proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("usage: amoeba"), lines[0]
    assert not [ln for ln in lines if "warning" in ln.lower()], lines
    assert lines[-1] == "LOADED", lines[-1]


def test_impossible_depth(capsys, tiny_plan_dir, tmp_path):
    code, err = run(capsys, "extract", str(tiny_plan_dir), "--depth", "2", "--out", str(tmp_path / "x"))
    assert code != 0 and len(err) == 1 and "depth 2 is not in the plan" in err[0]
    assert not (tmp_path / "x").exists()


def test_impossible_width(capsys, tiny_plan_dir, tmp_path):
    code, err = run(capsys, "extract", str(tiny_plan_dir), "--depth", "4", "--width", "0",
                    "--out", str(tmp_path / "x"))
    assert code != 0 and len(err) == 1 and "width ratio 0" in err[0]


def test_missing_plan(capsys, tmp_path):
    code, err = run(capsys, "extract", str(tmp_path / "nope"), "--depth", "4", "--out", str(tmp_path / "x"))
    assert code != 0 and len(err) == 1 and "not a folder" in err[0]


def test_existing_output(capsys, tiny_plan_dir, tmp_path):
    (tmp_path / "x").mkdir()
    code, err = run(capsys, "extract", str(tiny_plan_dir), "--depth", "4", "--out", str(tmp_path / "x"))
    assert code != 0 and "--force" in err[0]


def test_corrupt_checkpoint(capsys, tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    code, err = run(capsys, "plan", "--model", str(bad), "--out", str(tmp_path / "p"))
    assert code != 0 and len(err) == 1 and "cannot load the model" in err[0]


def test_unknown_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    code, err = run(capsys, "plan", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "p"))
    assert code != 0 and "supported are: llama, mistral, qwen2" in err[0]


@pytest.mark.parametrize("extra, needle", [
    (["--params", "nan"], "--params must be a positive, finite"),
    (["--params", "inf"], "--params must be a positive, finite"),
    (["--params", "0"], "--params must be a positive, finite"),
    (["--params", "1e5", "--depth", "4"], "--depth/--width cannot be given with it"),
    (["--params", "1e5", "--width", "0.5"], "--depth/--width cannot be given with it"),
])
def test_params_contradictions_and_nonsense(capsys, tiny_plan_dir, tmp_path, extra, needle):
    code, err = run(capsys, "extract", str(tiny_plan_dir), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_export_options_parse_integers_and_booleans():
    """--option group_fallback=false must reach the backend as False (it checks for a bool), not 'false'."""
    from amoeba_export.commands.export import parse_options

    assert parse_options(["group_fallback=false", "dynamic_shape=True", "max_context=256", "attention=masked"]) == {
        "group_fallback": False, "dynamic_shape": True, "max_context": 256, "attention": "masked"}


def test_third_party_noise_is_filtered_by_message_not_by_logger(caplog):
    """torchao's CUDA-kernel load failures are dropped; the same logger's other warnings still show."""
    import logging

    from amoeba_export.cli import quiet_third_party_noise

    quiet_third_party_noise()
    quiet_third_party_noise()  # idempotent: one filter per message
    logger = logging.getLogger("torchao")
    assert sum(type(f).__name__ == "_DropNoise" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /x/_C_cutlass_90a.abi3.so: Could not load this library")
        logger.warning("a real torchao warning")
    assert [r.getMessage() for r in caplog.records] == ["a real torchao warning"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_extract_fit_precision_is_what_meta_records(capsys, tiny_plan_dir, tmp_path, precision):
    from amoeba_export.artifacts import read_meta
    from amoeba_export.extract import source_plan

    plan = source_plan(tiny_plan_dir)
    # the deepest cut whose removed layers all follow a kept one, so at least one map is fitted
    depth = next(d for d in sorted(plan.depths) if 0 in plan.depth_table[d] and d < plan.dims.num_layers)
    assert main(["extract", str(tiny_plan_dir), "--out", str(tmp_path / "s"), "--depth", str(depth),
                 "--fit-precision", precision]) == 0
    rec = read_meta(tmp_path / "s")["reconstruction"]
    assert rec["depth_maps"] and rec["fit_precision"] == precision
    assert f"({precision} pass)" in capsys.readouterr().out


def test_depth_map_tokens_are_printed_and_more_than_the_plan_holds_is_an_error(capsys, tiny_plan_dir, tmp_path):
    """The fit's token count is in the printout and meta; asking for more calibration tokens than the plan holds
    is one error line naming the most it can give, never a silent cap."""
    from amoeba_export.artifacts import read_meta
    from amoeba_export.extract import source_plan

    plan = source_plan(tiny_plan_dir)
    held, row = plan.calibration_rows.numel(), plan.calibration_rows.shape[1]
    depth = next(d for d in sorted(plan.depths) if 0 in plan.depth_table[d] and d < plan.dims.num_layers)
    args = ["extract", str(tiny_plan_dir), "--depth", str(depth), "--depth-map-tokens"]
    assert main([*args, str(held), "--out", str(tmp_path / "s")]) == 0
    assert read_meta(tmp_path / "s")["reconstruction"]["calibration_tokens"] == held
    assert f"fitted on {held:,} tokens" in capsys.readouterr().out
    for tokens in (held + row, row - 1):
        assert main([*args, str(tokens), "--out", str(tmp_path / f"t{tokens}")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: depth-map tokens") and f"pass from {row:,} to {held:,}" in err[-1]
        assert not (tmp_path / f"t{tokens}").exists()


def test_exporter_future_warnings_are_filtered_and_others_are_not():
    import warnings

    from amoeba_export.cli import quiet_third_party_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_noise()
        warnings.warn("_check_is_size will be removed in a future PyTorch release", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else will be removed", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else will be removed"]
