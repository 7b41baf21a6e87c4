"""Artifact folders: every stage writes weights + a small ``meta.json``, atomically.

A stage writes into a hidden temporary sibling folder and renames it into place only when it is
complete, so a crash never leaves a folder that looks whole. A folder counts as complete exactly when
its ``meta.json`` exists (it is the last file written).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, OutputError, OutputExistsError

META = "meta.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block finishes without error."""
    out = Path(out)
    if out.exists():
        if not force:
            raise OutputExistsError(f"output folder {out} already exists", fix="pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        # The pid in the name lets a later run tell a killed run's leftovers from a live run's work.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder follows the user's umask
    except OSError as exc:  # a parent that is a file, a read-only or full disk
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}",
                          fix="pick an output path under a writable folder") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(out.parent).free
            raise OutputError(f"no space left on the device writing {out}: {written:,} bytes were written before it "
                              f"filled ({free:,} bytes free now); the finished folder needs more than that",
                              fix="free disk space or write to another disk") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"cannot write {out}: {exc.strerror}", fix="pick a writable output folder") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Delete ``out``'s temporary siblings left by runs that were killed (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically: a unique temporary file (two writers of one cache file never share it), flushed
    to disk, then renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_meta(folder: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json(Path(folder) / META, meta)


def read_meta(folder: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Read a stage folder's meta.json; a missing or unreadable one means the folder is not an artifact."""
    path = Path(folder) / META
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder} is not a folder", fix="pass the folder a previous stage wrote")
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {META}: it is incomplete or not an amoeba artifact",
            fix="re-run the stage that writes it",
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})", fix="re-run the stage that writes it") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a JSON {type(meta).__name__}, not an artifact record",
                              fix="re-run the stage that writes it")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(
            f"{folder} holds a {meta.get('kind')!r} artifact, expected {kind!r}",
            fix=f"pass a folder written by the {kind} stage",
        )
    return meta


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_inventory(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in a folder (meta.json excluded)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META
    }


def member_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` for a file name read from a meta.json, refusing names that leave the folder."""
    folder = Path(folder)
    path = folder / name
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise CheckpointError(f"{folder}/{META} names {name!r}, which is outside the folder",
                              fix="re-run the stage that wrote it; never edit meta.json by hand") from None
    return path


def file_problems(folder: str | os.PathLike, files: Any, *, checksums: bool = True) -> list[str]:
    """Every way the files a meta.json records differ from the folder: a record that is not
    ``{"bytes": int, "sha256": str}``, a name that leaves the folder, a missing file, another size and — with
    ``checksums`` — another sha256. Sizes are cheap and always checked; hashing reads every byte."""
    folder = Path(folder)
    if not isinstance(files, dict):
        return [f"'files' is a {type(files).__name__}, not a mapping of file records"]
    problems = []
    for name, record in sorted(files.items(), key=lambda kv: str(kv[0])):
        try:
            path = member_path(folder, name)
        except CheckpointError:
            problems.append(f"{name!r} is outside the folder")
            continue
        # Both fields, always: a record without its checksum (or with a null one) would skip the check.
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and not isinstance(record["bytes"], bool) and record["bytes"] >= 0
                and isinstance(record.get("sha256"), str) and SHA256.fullmatch(record["sha256"])):
            problems.append(f"the record of {name!r} is not {{bytes: int, sha256: 64 hex digits}}: {record!r:.60}")
            continue
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            problems.append(f"{name} is truncated or altered ({size} bytes, {META} says {record['bytes']})")
        elif checksums and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} does not match its recorded sha256 (altered or corrupt)")
    return problems


def verify_files(folder: str | os.PathLike, files: Any, *, checksums: bool = True) -> None:
    """Check the files a meta.json records (see :func:`file_problems`); every problem is listed in one
    CheckpointError."""
    if problems := file_problems(folder, files, checksums=checksums):
        raise CheckpointError(f"{folder} is not the artifact its {META} records: " + "; ".join(problems),
                              fix="re-run the stage that wrote it with --force")
