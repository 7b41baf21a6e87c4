"""Seeded fuzz of artifact meta.json (issue 13): ≥ 200 mutated records — type swaps, truncations, NaN/inf, huge
values, lists for scalars, missing keys, torn or binary files — and damaged files under an intact record, fed to
`amoeba validate` as a user types it. Each ends in success or one `error:` line with a non-zero exit; never a
traceback, and never exit 0 when the record's integrity fields changed or a file no longer matches it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from amoeba_export.cli import main
from amoeba_export.testing import TEXT

CASES = 220
INTEGRITY = ("kind", "version", "backend", "quant", "model_file")
WEIRD: list[Any] = [None, -1, 0, 1.5, 10**30, 1e308, float("nan"), float("inf"), float("-inf"), True, "",
                    "x", [], {}, ["F32"], [1, 2], {"a": 1}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    from amoeba_export.backends import get_backend
    from amoeba_export.testing import tiny_llama

    root = tmp_path_factory.mktemp("fuzz")
    # As small as a model gets: a mutation that passes runs the whole validation.
    tiny_llama(root / "model", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=32)
    artifact = get_backend("pytorch").export(root / "model", root / "artifact", "F32").path
    (root / "text.txt").write_text(TEXT)
    return artifact, root / "text.txt"


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON tree (dict keys and list indices)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _truncate(value: Any) -> Any:
    if isinstance(value, str):
        return value[: len(value) // 2]
    if isinstance(value, list):
        return value[: len(value) // 2]
    if isinstance(value, dict):
        return dict(list(value.items())[: len(value) // 2])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value // 10 if isinstance(value, int) else value / 10
    return None


def _mutate(meta: dict, rng: random.Random) -> dict:
    meta = json.loads(json.dumps(meta))
    for _ in range(rng.randint(1, 2)):
        paths = _paths(meta)
        if not paths:
            break
        path = rng.choice(paths)
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        op = rng.choice(["delete", "swap", "truncate", "nonfinite", "huge", "listify", "swap"])
        if op == "delete":
            parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
        elif op == "swap":
            parent[key] = rng.choice(WEIRD)
        elif op == "truncate":
            parent[key] = _truncate(value)
        elif op == "nonfinite":
            parent[key] = rng.choice([float("nan"), float("inf"), float("-inf")])
        elif op == "huge":
            parent[key] = rng.choice([10**30, 1e308, -(10**18), 2**63])
        else:
            parent[key] = [value]
    return meta


def _broken_record(original: dict, mutated: Any) -> bool:
    """Whether the mutation touched what the artifact is checked against (exit 0 would trust a lie). Dropping a
    whole record of a file other than the model leaves every remaining record true, so it may pass."""
    if not isinstance(mutated, dict):
        return True
    if any(mutated.get(k, "<gone>") != original.get(k) for k in INTEGRITY):
        return True
    files, kept = original["files"], mutated.get("files")
    if not isinstance(kept, dict) or original["model_file"] not in kept:
        return True
    return any(name not in files or kept[name] != files[name] for name in kept)


def _changes(original: dict, mutated: dict) -> dict:
    return {k: (original.get(k), mutated.get(k)) for k in set(original) | set(mutated)
            if original.get(k) != mutated.get(k)}


def test_mutated_artifact_meta_validates_or_fails_in_one_line(exported, tmp_path, capsys):
    artifact, text = exported
    meta0 = json.loads((artifact / "meta.json").read_text())
    raw0 = (artifact / "meta.json").read_bytes()
    rng = random.Random(13)
    outcomes = {"ok": 0, "error": 0}
    work = tmp_path / "a"
    shutil.copytree(artifact, work)
    for case in range(CASES):
        (work / "meta.json").write_bytes(raw0)
        for name in meta0["files"]:  # restore what the previous case damaged (a few small files)
            shutil.copy2(artifact / name, work / name)
        kind = rng.random()
        broken = True
        if kind < 0.08:  # the file itself: torn, binary, or JSON of another type
            (work / "meta.json").write_bytes(rng.choice([raw0[: rng.randrange(1, len(raw0))], bytes(range(256)),
                                                         b"[1, 2]", b"42", b"null", b""]))
        elif kind < 0.16:  # an intact record over a damaged file
            name = rng.choice(sorted(meta0["files"]))
            data = (work / name).read_bytes()
            (work / name).write_bytes(rng.choice([data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1]), b""]))
        else:
            mutated = _mutate(meta0, rng)
            (work / "meta.json").write_text(json.dumps(mutated))
            broken = _broken_record(meta0, mutated)
        code = main(["validate", str(work), "--text-file", str(text), "--max-tokens", "64", "--seq-len", "32"])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert "Traceback" not in err, (case, err)
        if code == 0:
            assert not broken, (case, _changes(meta0, json.loads((work / "meta.json").read_text())))
            assert not errors, (case, err)
            outcomes["ok"] += 1
        else:
            assert code in (2, 3) and len(errors) == 1, (case, code, err)
            outcomes["error"] += 1
    print(outcomes)
    assert outcomes["error"] > CASES // 2 and outcomes["ok"] > 10, outcomes
