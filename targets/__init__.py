"""Device targets: TOML profiles (backend, quant, threads, context, budgets) shipped here or passed by path."""

from .profile import (
           Budgets,
           TargetProfile,
           load_profile,
           parse_profile,
           profile_problems,
           shipped_names,
           shipped_profiles,
)

__all__ = ["Budgets", "TargetProfile", "load_profile", "parse_profile", "profile_problems", "shipped_names",
           "shipped_profiles"]
