"""A damaged plan folder is refused on load with one clear error — never a traceback, never a broken subnet."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from amoeba_export.cli import main
from amoeba_export.errors import CheckpointError
from amoeba_export.plan import Plan


@pytest.fixture
def plan_copy(tiny_plan_dir, tmp_path):
    """A copy whose meta.json records no file checksums (as plans written before records): the damage below
    then reaches the structural checks, which are what catches a plan a faulty writer recorded as it was."""
    out = tmp_path / "plan"
    shutil.copytree(tiny_plan_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("files", None)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("name", ["plan.json", "width.safetensors", "gram.safetensors"])
def test_a_file_that_differs_from_its_record_is_refused(tiny_plan_dir, tmp_path, capsys, name):
    """With its records intact, any change to a plan file is caught before use (the covariances by size on
    load and by sha256 when first read), naming the file."""
    plan = tmp_path / "plan"
    shutil.copytree(tiny_plan_dir, plan)
    data = bytearray((plan / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    (plan / name).write_bytes(bytes(data))
    code = main(["extract", str(plan), "--depth", "6", "--width", "0.5", "--mode", "uniform",
                 "--out", str(tmp_path / "s")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1 and name in err[0] and "sha256" in err[0], err
    assert not (tmp_path / "s").exists()
    (plan / name).write_bytes(bytes(data[:-1]))  # truncated: caught by size on load, whichever file
    with pytest.raises(CheckpointError, match=name):
        Plan.load(plan)


def _edit_body(folder, edit):
    body = json.loads((folder / "plan.json").read_text())
    edit(body)
    (folder / "plan.json").write_text(json.dumps(body))


def test_a_cut_permutation_is_refused_by_load_and_by_extract(plan_copy, tmp_path, capsys):
    tensors = load_file(str(plan_copy / "width.safetensors"))
    tensors["layer.1.mlp_perm"] = tensors["layer.1.mlp_perm"][:10].contiguous()
    save_file(tensors, str(plan_copy / "width.safetensors"))
    with pytest.raises(CheckpointError, match="layer 1: mlp_perm is not a permutation of 128 entries"):
        Plan.load(plan_copy)
    assert main(["extract", str(plan_copy), "--depth", "6", "--width", "0.5", "--out", str(tmp_path / "s")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "mlp_perm" in err[0]
    assert not (tmp_path / "s").exists()


def test_a_repeated_index_is_not_a_permutation(plan_copy):
    tensors = load_file(str(plan_copy / "width.safetensors"))
    perm = tensors["layer.0.head_perm"].clone()
    perm[0] = perm[1]
    tensors["layer.0.head_perm"] = perm
    save_file(tensors, str(plan_copy / "width.safetensors"))
    with pytest.raises(CheckpointError, match="layer 0: head_perm is not a permutation"):
        Plan.load(plan_copy)


@pytest.mark.parametrize("edit, needle", [
    (lambda b: b["depth_tables"]["dp"].update({"5": [0, 1, 2, 3, 99]}), "depth_tables.dp['5']"),
    (lambda b: b["dims"].update(num_layers="six"), "dims must hold integers in 1.."),
    (lambda b: b["config"].update(round_to=0), "round_to must be ≥ 1"),
    (lambda b: b.update(depth_tables=[1, 2]), "depth_tables is not a non-empty mapping"),
])
def test_plan_json_damage_is_named(plan_copy, edit, needle):
    _edit_body(plan_copy, edit)
    with pytest.raises(CheckpointError) as info:
        Plan.load(plan_copy)
    assert needle in str(info.value)


def test_meta_json_that_is_a_list(plan_copy):
    (plan_copy / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list"):
        Plan.load(plan_copy)


def test_mutated_plans_load_or_fail_clearly(plan_copy):
    """200 seeded mutations of plan.json and of the ranking tensors: a valid plan or a CheckpointError."""
    rng = random.Random(0)
    body0 = json.loads((plan_copy / "plan.json").read_text())
    tensors0 = load_file(str(plan_copy / "width.safetensors"))
    weird = [None, -1, 0, 1.5, "x", [], {}, [0, 0], 10**9, float("nan"), True]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        body = json.loads(json.dumps(body0))
        tensors = dict(tensors0)
        if rng.random() < 0.5:
            section = rng.choice(["dims", "config", "depth_tables"])
            if isinstance(body[section], dict) and body[section] and rng.random() < 0.8:
                key = rng.choice(list(body[section]))
                body[section][key] = rng.choice(weird)
            else:
                body[section] = rng.choice(weird)
        else:
            key = rng.choice(sorted(tensors))
            t = tensors[key]
            tensors[key] = rng.choice([t[: max(1, t.numel() // 2)], t.flip(0) * 0, torch.cat([t, t[:1]]),
                                       t.float(), t])
        (plan_copy / "plan.json").write_text(json.dumps(body))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(plan_copy / "width.safetensors"))
        try:
            plan = Plan.load(plan_copy)
        except CheckpointError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        for rk in plan.rankings:  # whatever loads is usable: real permutations of the right sizes
            assert sorted(rk.mlp_perm.tolist()) == list(range(plan.dims.intermediate_size))
    assert outcomes["error"] > 100
