"""``amoeba targets``: list the shipped device profiles, or check/show one (a name or a .toml path)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", nargs="?", help="a shipped name or a .toml file: validate it and show its fields")


def run(args: argparse.Namespace) -> int:
    import json

    from ..targets import load_profile, shipped_profiles

    if args.profile:
        profile = load_profile(args.profile)  # ConfigError lists every problem
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    profiles = shipped_profiles()
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        print(f"{p.name:<{width}}  {p.summary()}")
        print(f"{'':<{width}}  {p.description}")
    print("add your own: copy targets/laptop.toml, edit it, and pass its path as --target FILE.toml")
    return 0
