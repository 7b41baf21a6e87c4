"""Knowledge-preserving subnet selection: depth by DP, width by importance, as one plan."""

from .build import build_plan
from .plan import DEPTH_METHODS, WIDTH_MODES, Plan, PlanConfig, load_elastic

__all__ = ["DEPTH_METHODS", "WIDTH_MODES", "Plan", "PlanConfig", "build_plan", "load_elastic"]
