"""Lazy package exports: a package's ``__init__`` names what it offers without importing it.

Why: importing a torch-free submodule (``plan.config``, ``reconstruct.modes``, ``finetune.config``) runs its
package's ``__init__`` first, and an eager ``from .plan import Plan`` there loads torch — seconds of start-up
for ``amoeba VERB --help``. With :func:`lazy_exports` a name's module is imported on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in submodule ``exports[name]``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)  # later look-ups skip this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
