"""Run a backend's native runtime in a child process, behind the :class:`Runner` contract.

llama.cpp, onnxruntime and ExecuTorch are native code: a bad build for the CPU (llama.cpp's AMX repacking on
a Xeon, an instruction the machine lacks) kills the process with a signal, and in-process that takes
validation, a deploy or a whole pytest run down with it and no message. So ``Backend.load`` returns an
:class:`IsolatedRunner` by default: the runtime lives in ``python -m amoeba_export.backends.isolation``,
and a crash there becomes one :class:`RuntimeCrashError` naming the runtime, signal, file and quant type.

Protocol: length-prefixed JSON headers over two pipes, each optionally followed by one raw array (never
pickle). Only the contract's calls cross the pipe — ``logits`` returns one ``[T, vocab]`` float32 array,
``generate`` runs its whole loop in the child — so the overhead is one message per call, not per token.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from amoeba_export import errors
from amoeba_export.errors import BackendError, RuntimeCrashError

from .base import Artifact, Runner

# Fault injection for the crash report's own tests: the child kills itself with this signal once it has
# loaded the runtime. Never set in normal use.
FAULT_ENV = "AMOEBA_RUNTIME_FAULT"
_HEADER = struct.Struct("<Q")


def _send(stream: BinaryIO, header: dict[str, Any], array: np.ndarray | None = None) -> None:
    if array is not None:
        array = np.ascontiguousarray(array)
        header = {**header, "array": {"dtype": array.dtype.str, "shape": list(array.shape)}}
    body = json.dumps(header).encode()
    stream.write(_HEADER.pack(len(body)) + body)
    if array is not None:
        stream.write(memoryview(array).cast("B"))
    stream.flush()


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(stream: BinaryIO) -> tuple[dict[str, Any], np.ndarray | None] | None:
    """One message, or None when the other side is gone."""
    size = _read_exactly(stream, _HEADER.size)
    if size is None:
        return None
    body = _read_exactly(stream, _HEADER.unpack(size)[0])
    if body is None:
        return None
    header = json.loads(body)
    spec = header.get("array")
    if spec is None:
        return header, None
    dtype = np.dtype(spec["dtype"])
    raw = _read_exactly(stream, int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize)
    if raw is None:
        return None
    return header, np.frombuffer(raw, dtype=dtype).reshape(spec["shape"])


def error_reply(exc: Exception) -> dict[str, Any]:
    """A child's failure as a JSON reply: an :class:`~amoeba_export.errors.AmoebaError` by class name, message and
    fix (so the parent can raise the same error); anything else as its type and message."""
    if isinstance(exc, errors.AmoebaError):
        message = str(exc).removesuffix(f" ({exc.fix})") if exc.fix else str(exc)
        return {"ok": False, "error": type(exc).__name__, "message": message, "fix": exc.fix}
    return {"ok": False, "message": f"{type(exc).__name__}: {exc}"}


def raise_reply_error(reply: dict[str, Any], context: str, fix: str) -> None:
    """Raise the error a failed ``reply`` (:func:`error_reply`) carries: the same AmoebaError subclass with its fix
    where it names one (ConfigError's signature differs), else a BackendError ``"<context>: <message>"``."""
    cls = getattr(errors, reply.get("error", ""), None)
    if isinstance(cls, type) and issubclass(cls, errors.AmoebaError) and cls is not errors.ConfigError:
        raise cls(reply["message"], fix=reply.get("fix"))
    raise BackendError(f"{context}: {reply['message']}", fix=reply.get("fix") or fix)


def crash_error(artifact: Artifact, returncode: int, runtime: str, fix: str) -> RuntimeCrashError:
    """The one-line error for a runtime process that ``artifact`` killed with a signal."""
    return RuntimeCrashError(f"{runtime} crashed ({signal_name(returncode)}) running {artifact.model_file} "
                             f"({artifact.backend}/{artifact.quant})",
                             fix=fix or "report the runtime version and this machine's CPU")


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class IsolatedRunner(Runner):
    """A :class:`Runner` whose runtime runs in a child process; see the module docstring."""

    def __init__(self, backend: str, artifact: Artifact, *, threads: int | None = None,
                 runtime: str = "the runtime", crash_fix: str = "", **options: Any) -> None:
        self._artifact = artifact
        self._runtime = runtime
        self._crash_fix = crash_fix
        self._stderr = tempfile.TemporaryFile()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cmd = [sys.executable, "-m", "amoeba_export.backends.isolation", str(req_r), str(rep_w)]
        self._proc = subprocess.Popen(cmd, pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL,
                                      stdout=self._stderr, stderr=self._stderr)
        os.close(req_r)
        os.close(rep_w)
        self._requests = os.fdopen(req_w, "wb")
        self._replies = os.fdopen(rep_r, "rb")
        info, _ = self._call("open", backend=backend, artifact=str(artifact.path), threads=threads, options=options)
        self._vocab_size = int(info["vocab_size"])
        self.threads = info.get("threads")
        self._can_tokenize = bool(info.get("can_tokenize"))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def can_tokenize(self) -> bool:  # the child's runner decides, not this proxy's method list
        return self._can_tokenize

    def _call(self, op: str, **args: Any) -> tuple[dict[str, Any], np.ndarray | None]:
        if self._proc.poll() is not None and self._proc.returncode != 0:
            self._raise_dead()
        try:
            _send(self._requests, {"op": op, **args})
            reply = _recv(self._replies)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            self._raise_dead()
        header, array = reply
        if not header.get("ok"):
            raise_reply_error(header, f"{self._runtime} failed on {self._artifact.model_file.name}",
                              "re-export the artifact; run amoeba validate for details")
        return header, array

    def _raise_dead(self) -> None:
        code = self._proc.wait()
        if code < 0:
            raise crash_error(self._artifact, code, self._runtime, self._crash_fix)
        what = f"{self._artifact.model_file} ({self._artifact.backend}/{self._artifact.quant})"
        self._stderr.seek(0)
        tail = (self._stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"{self._runtime} exited with code {code} running {what}: {tail}",
                           fix="re-export the artifact; run amoeba validate for details")

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        _, array = self._call("logits", ids=[int(t) for t in input_ids])
        return np.array(array)  # own the memory: the reply buffer is read-only

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        header, _ = self._call("generate", ids=[int(t) for t in input_ids], max_new_tokens=int(max_new_tokens),
                               temperature=float(temperature), top_p=float(top_p), seed=int(seed),
                               stop_ids=[int(t) for t in stop_ids])
        return header["tokens"]

    def tokenize(self, text: str) -> list[int]:
        if not self.can_tokenize:
            raise BackendError(f"the {self._artifact.backend} runner cannot tokenize", fix="tokenize with HF")
        return self._call("tokenize", text=text)[0]["tokens"]

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        self._proc = None
        try:
            if proc.poll() is None:
                _send(self._requests, {"op": "close"})
        except OSError:
            pass
        for stream in (self._requests, self._replies):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._stderr.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass


# --- child side -------------------------------------------------------------------------------------
def _serve(requests: BinaryIO, replies: BinaryIO) -> int:
    from . import get_backend

    runner: Runner | None = None
    while (message := _recv(requests)) is not None:
        req, _ = message
        op = req.pop("op")
        try:
            if op == "close":
                break
            if op == "open":
                backend = get_backend(req["backend"])
                runner = backend.open_runner(Artifact.open(req["artifact"]), threads=req["threads"],
                                             **req["options"])
                if fault := os.environ.get(FAULT_ENV):
                    os.kill(os.getpid(), signal.Signals[fault])
                _send(replies, {"ok": True, "vocab_size": runner.vocab_size, "threads": runner.threads,
                                "can_tokenize": runner.can_tokenize})
            elif op == "logits":
                _send(replies, {"ok": True}, np.asarray(runner.logits(req["ids"]), dtype=np.float32))
            elif op == "generate":
                ids = req.pop("ids")
                _send(replies, {"ok": True, "tokens": [int(t) for t in runner.generate(ids, **req)]})
            elif op == "tokenize":
                _send(replies, {"ok": True, "tokens": [int(t) for t in runner.tokenize(req["text"])]})
            else:
                _send(replies, {"ok": False, "message": f"unknown request {op!r}"})
        except Exception as exc:  # ours by class and fix; the runtime's own reported, the parent decides
            _send(replies, error_reply(exc))
    if runner is not None:
        runner.close()
    return 0


def main(argv: list[str]) -> int:
    requests = os.fdopen(int(argv[0]), "rb")
    replies = os.fdopen(int(argv[1]), "wb")
    return _serve(requests, replies)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["FAULT_ENV", "IsolatedRunner", "RuntimeCrashError", "crash_error", "error_reply", "raise_reply_error",
           "signal_name"]
