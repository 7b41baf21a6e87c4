"""Export backends, one per format, looked up by name. Modules are imported lazily."""

from __future__ import annotations

import importlib

from amoeba_export.errors import BackendError

from .base import Artifact, Backend, Runner

# name -> "module:Class" (relative to this package); the runtime is imported only when used.
REGISTRY: dict[str, str] = {
    "pytorch": "pytorch:PyTorchBackend",
    "gguf": "gguf.backend:GGUFBackend",
    "onnx": "onnx.backend:OnnxBackend",
    "executorch": "executorch.backend:ExecuTorchBackend",
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises BackendError listing the known ones."""
    target = REGISTRY.get(name.lower())
    if target is None:
        raise BackendError(f"unknown backend {name!r}; supported are: {', '.join(REGISTRY)}",
                           fix="pass one of the supported backends")
    module_name, cls_name = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    backend = getattr(module, cls_name)()
    backend.check_runtime()
    return backend


def load_artifact(path) -> tuple[Artifact, Backend]:
    artifact = Artifact.open(path)
    return artifact, get_backend(artifact.backend)


__all__ = ["REGISTRY", "Artifact", "Backend", "Runner", "get_backend", "load_artifact"]
