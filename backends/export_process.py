"""One export in a child process: how long-lived processes (``amoeba deploy``, ``amoeba demo``) export.

Why not in-process: by the time a deploy exports, its process holds what the earlier stages loaded (the elastic
model, the search's probe exports, in the demo also the plan, the table and the fine-tune). In ``make demo`` on
a 2-core Xeon the phone's export started at 5.1 GB of RSS and peaked at 5.7 GB, against ≈ 2.1 GB for the same
export in a fresh process — a phone-sized budget of the machine spent on leftovers. A native crash inside an
export (XNNPACK, llama.cpp's quantizer) would also end the whole deploy with no message; here it becomes one
:class:`~amoeba_export.errors.RuntimeCrashError`.

Protocol: the request and the reply are JSON files (never pickle); the child's stdout and stderr are the
parent's, so its progress bars show where they would in-process. An error the user can fix comes back as the same
:class:`~amoeba_export.errors.AmoebaError` subclass with its ``fix``; anything else as a ``BackendError``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from amoeba_export.errors import BackendError, RuntimeCrashError

from .base import Artifact
from .isolation import FAULT_ENV, error_reply, raise_reply_error, signal_name


def export_in_child(backend: str, hf_dir: str | Path, out_dir: str | Path, quant: str, *, force: bool = False,
                    **options: Any) -> Artifact:
    """``get_backend(backend).export(hf_dir, out_dir, quant, force=force, **options)``, run in a fresh process."""
    request = {"backend": backend, "hf_dir": str(hf_dir), "out_dir": str(out_dir), "quant": quant,
               "force": force, "options": options}
    with tempfile.TemporaryDirectory(prefix="amoeba-export-") as tmp:
        request_path, reply_path = Path(tmp) / "request.json", Path(tmp) / "reply.json"
        request_path.write_text(json.dumps(request))
        code = subprocess.run([sys.executable, "-m", "amoeba_export.backends.export_process", str(request_path),
                               str(reply_path)], stdin=subprocess.DEVNULL).returncode
        reply = json.loads(reply_path.read_text()) if reply_path.is_file() else None
    what = f"the {backend}/{quant} export of {hf_dir}"
    if code < 0:
        raise RuntimeCrashError(f"{what} crashed ({signal_name(code)})",
                                fix="report the package versions and this machine's CPU")
    if reply is None:
        raise BackendError(f"{what} exited with code {code} and no reply", fix="run amoeba export on it to see why")
    if not reply.get("ok"):
        raise_reply_error(reply, f"{what} failed", "run amoeba export on it to see the whole error")
    return Artifact.open(out_dir)


def main(argv: list[str]) -> int:
    request, reply_path = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    from amoeba_export.cli import quiet_third_party_noise

    from . import get_backend

    quiet_third_party_noise()  # the same lines filtered as in the parent's CLI
    if fault := os.environ.get(FAULT_ENV):  # the crash report's own tests
        os.kill(os.getpid(), signal.Signals[fault])
    try:
        get_backend(request["backend"]).export(Path(request["hf_dir"]), Path(request["out_dir"]), request["quant"],
                                               force=request["force"], **request["options"])
    except Exception as exc:  # ours by class and fix; a bug or a library's error in one line, the parent raises it
        reply_path.write_text(json.dumps(error_reply(exc)))
        return 1
    reply_path.write_text(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
