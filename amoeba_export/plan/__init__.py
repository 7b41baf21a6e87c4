"""Knowledge-preserving subnet selection: depth by DP, width by importance, as one plan.

Exports load lazily (see ``amoeba_export.lazy``): ``plan.config`` is torch-free, for the CLI's ``--help``."""

from ..lazy import lazy_exports

__all__ = ["DEPTH_METHODS", "PLAN_VERSION", "WIDTH_MODES", "Plan", "PlanConfig", "build_plan", "load_elastic"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "DEPTH_METHODS": "config", "PLAN_VERSION": "config", "WIDTH_MODES": "config", "PlanConfig": "config",
    "Plan": "plan", "load_elastic": "plan", "build_plan": "build"})
