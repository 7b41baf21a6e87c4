"""Start-up cost of the CLI: median wall time of `amoeba --help` and of every `amoeba VERB --help`.

Each call is a fresh process, as a user's shell starts it. Goal (issue 13): ≤ 0.5 s and no warning lines.

    python bench/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from amoeba_export.cli import VERBS


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "amoeba_export.cli", *args], capture_output=True, text=True)
    return time.perf_counter() - start, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    rows = {"--help": ["--help"], **{f"{verb} --help": [verb, "--help"] for verb in VERBS}}
    result: dict[str, dict] = {}
    for name, argv in rows.items():
        runs = [timed(argv) for _ in range(args.runs)]
        warnings = sorted({ln for _, err in runs for ln in err.splitlines() if ln.strip()})
        result[name] = {"median_s": statistics.median(t for t, _ in runs), "stderr_lines": warnings}
        print(f"amoeba {name:<20} {result[name]['median_s']:.3f} s  {len(warnings)} stderr line(s)", flush=True)
    slowest = max(result, key=lambda k: result[k]["median_s"])
    print("RESULT " + json.dumps({"help_seconds": result["--help"]["median_s"],
                                  "verb_help_seconds": {v: result[f"{v} --help"]["median_s"] for v in VERBS},
                                  "slowest_verb_help": slowest,
                                  "slowest_verb_help_seconds": result[slowest]["median_s"],
                                  "stderr_lines": sum(len(r["stderr_lines"]) for r in result.values()),
                                  "runs": args.runs, "per_command": result}))


if __name__ == "__main__":
    main()
