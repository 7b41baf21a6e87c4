"""Device target profiles: small TOML files naming a backend, a quant scheme, threads, context and budgets.

A profile is validated as a whole on load: every problem in the file is listed in one ConfigError, so a
user fixes a broken file in one pass. Budgets are optional; a missing budget does not constrain the search.
"""

from __future__ import annotations

import importlib
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amoeba_export.errors import ConfigError

PROFILE_VERSION = 1
SHIPPED_DIR = Path(__file__).parent

# Every key a profile may hold, by table; anything else is a typo and reported as such.
TOP_KEYS = {"version", "name", "description", "device", "backend", "quant", "threads", "context_length",
            "budgets", "export", "search"}
BUDGET_KEYS = {"max_file_mb", "max_memory_mb", "min_decode_tok_s"}
# Largest sensible value of each budget and setting: beyond these a number is a typo, not a device.
BUDGET_CEILINGS = {"max_file_mb": 1e7, "max_memory_mb": 1e7, "min_decode_tok_s": 1e6}
MAX_THREADS = 1024
MAX_CONTEXT = 1 << 20
SEARCH_KEYS = {"width_modes", "max_candidates"}
WIDTH_MODES = ("global", "uniform")


@dataclass(frozen=True)
class Budgets:
    """Hard limits a deployed subnet must meet (None: no limit). MB are 10^6 bytes."""

    max_file_mb: float | None = None
    max_memory_mb: float | None = None
    min_decode_tok_s: float | None = None

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in asdict(self).items() if v is not None]


@dataclass(frozen=True)
class TargetProfile:
    """One device target. ``export`` holds backend export options (e.g. ONNX's per-layer ``exclude`` list)."""

    name: str
    backend: str
    quant: str
    threads: int
    context_length: int
    budgets: Budgets
    description: str = ""
    device: str = ""
    export: dict[str, Any] = field(default_factory=dict, hash=False)
    width_modes: tuple[str, ...] = ("global",)
    max_candidates: int = 40
    path: str = ""
    version: int = PROFILE_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["width_modes"] = list(self.width_modes)
        return d

    def with_budgets(self, **overrides: float | None) -> TargetProfile:
        """A copy with some budgets replaced (command-line overrides); re-validated."""
        merged = {**asdict(self.budgets), **overrides}
        problems = _budget_problems(merged)
        if problems:
            raise ConfigError(f"budget overrides for {self.name}", problems, fix="fix the listed values")
        return TargetProfile(**{**self.__dict__, "budgets": Budgets(**merged)})

    def summary(self) -> str:
        budgets = ", ".join(f"{k}={v:g}" for k, v in self.budgets.items()) or "no budgets"
        return f"{self.backend}/{self.quant}, {self.threads} threads, ctx {self.context_length}; {budgets}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _budget_problems(budgets: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(budgets) - BUDGET_KEYS):
        out.append(f"unknown budget {key!r} (known: {', '.join(sorted(BUDGET_KEYS))})")
    for key in sorted(BUDGET_KEYS & set(budgets)):
        value, ceiling = budgets[key], BUDGET_CEILINGS[key]
        # NaN compares false with everything, so `value <= 0` alone would let it through and silently
        # remove the limit; inf or 1e308 is no budget either.
        if value is not None and (not _number(value) or not math.isfinite(value) or not 0 < value <= ceiling):
            out.append(f"budgets.{key} must be a positive number ≤ {ceiling:g}, got {value!r}")
    return out


def _backend_class(name: str):
    """The backend class without importing its runtime (validation must work where a runtime is missing)."""
    from amoeba_export.backends import REGISTRY

    module_name, cls_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"amoeba_export.backends.{module_name}"), cls_name)


def profile_problems(data: dict[str, Any]) -> list[str]:
    """Every problem of a parsed profile (empty when valid)."""
    from amoeba_export.backends import REGISTRY

    out: list[str] = []
    for key in sorted(set(data) - TOP_KEYS):
        out.append(f"unknown key {key!r}")
    if data.get("version", PROFILE_VERSION) != PROFILE_VERSION:
        out.append(f"version {data.get('version')!r} is not supported (this reads version {PROFILE_VERSION})")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        out.append("name is missing (a non-empty string)")
    for key in ("name", "description", "device", "backend", "quant"):
        if key in data and not isinstance(data[key], str):
            out.append(f"{key} must be a string, got {data[key]!r}")
    backend = data.get("backend")
    supported = ", ".join(b for b in REGISTRY if b != "pytorch")
    if backend is None:
        out.append("backend is missing")
    elif isinstance(backend, str) and (backend not in REGISTRY or backend == "pytorch"):
        out.append(f"unknown backend {backend!r} (supported are: {supported})")
    elif isinstance(backend, str):
        quant = data.get("quant")
        cls = _backend_class(backend)
        if quant is None:
            out.append("quant is missing")
        elif not isinstance(quant, str):
            pass  # reported above
        elif quant.lower() not in {q.lower() for q in cls.quant_types}:
            out.append(f"unknown quant {quant!r} for {backend} (supported are: {', '.join(cls.quant_types)})")
        else:
            if backend == "executorch":
                from amoeba_export.backends.executorch.recipes import RECIPES

                if RECIPES[quant.lower()].broken:
                    out.append(f"executorch recipe {quant!r} is disabled: {RECIPES[quant.lower()].broken}")
            if isinstance(data.get("export", {}), dict):
                quant = {q.lower(): q for q in cls.quant_types}[quant.lower()]
                out += [f"[export] {p}" for p in cls().option_problems(quant, dict(data.get("export", {})))]
    threads = data.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
        out.append(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
    ctx = data.get("context_length", 512)
    if not isinstance(ctx, int) or isinstance(ctx, bool) or not 16 <= ctx <= MAX_CONTEXT:
        out.append(f"context_length must be an integer in 16..{MAX_CONTEXT}, got {ctx!r}")
    for table in ("budgets", "export", "search"):
        if table in data and not isinstance(data[table], dict):
            out.append(f"[{table}] must be a table")
    if isinstance(data.get("budgets", {}), dict):
        out += _budget_problems(data.get("budgets", {}))
    search = data.get("search", {})
    if isinstance(search, dict):
        for key in sorted(set(search) - SEARCH_KEYS):
            out.append(f"unknown search option {key!r} (known: {', '.join(sorted(SEARCH_KEYS))})")
        modes = search.get("width_modes", ["global"])
        if not isinstance(modes, list) or not modes or any(m not in WIDTH_MODES for m in modes):
            out.append(f"search.width_modes must be a non-empty list of {', '.join(WIDTH_MODES)}, got {modes!r}")
        mc = search.get("max_candidates", 40)
        if not isinstance(mc, int) or isinstance(mc, bool) or mc < 2:
            out.append(f"search.max_candidates must be an integer ≥ 2, got {mc!r}")
    return out


def parse_profile(data: dict[str, Any], *, path: str = "") -> TargetProfile:
    """A validated profile from parsed TOML; raises ConfigError listing every problem."""
    problems = profile_problems(data)
    if problems:
        raise ConfigError(f"target profile {path or data.get('name', '?')}", problems,
                          fix="fix the listed fields (see targets/laptop.toml for a complete example)")
    cls = _backend_class(data["backend"])
    quant = {q.lower(): q for q in cls.quant_types}[str(data["quant"]).lower()]
    search = data.get("search", {})
    return TargetProfile(
        name=data["name"], backend=data["backend"], quant=quant, threads=data.get("threads", 1),
        context_length=data.get("context_length", 512), budgets=Budgets(**data.get("budgets", {})),
        description=data.get("description", ""), device=data.get("device", ""), export=dict(data.get("export", {})),
        width_modes=tuple(search.get("width_modes", ["global"])), max_candidates=search.get("max_candidates", 40),
        path=path)


def load_profile(spec: str | Path) -> TargetProfile:
    """A shipped profile by name (``laptop``) or a user's TOML file by path."""
    path = Path(spec)
    if not path.suffix == ".toml":
        shipped = SHIPPED_DIR / f"{spec}.toml"
        if not shipped.is_file():
            raise ConfigError(f"target {spec!r}", [f"no shipped profile is called {spec!r} (shipped: "
                                                   f"{', '.join(shipped_names())})"],
                              fix="pass a shipped name or the path of your own .toml file")
        path = shipped
    if not path.is_file():
        raise ConfigError(f"target {spec}", [f"{path} does not exist"], fix="pass the path of a .toml profile")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"target profile {path}", ["not a text file (not UTF-8)"],
                          fix="pass a TOML text file such as targets/laptop.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"target profile {path}", [f"not valid TOML: {exc}"], fix="fix the TOML syntax") from exc
    return parse_profile(data, path=str(path))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def shipped_profiles() -> list[TargetProfile]:
    return [load_profile(name) for name in shipped_names()]
