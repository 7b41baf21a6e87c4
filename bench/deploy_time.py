"""Deploy the default model to the laptop and 8 GB phone targets; stage wall times and prediction errors.

Usage: python bench/deploy_time.py [--targets laptop android-8gb] [--budget max_file_mb=60] [--out DIR]
Budget overrides apply to every target (use them to deploy a small subnet where the CPU is slow).
Prints each stage's wall time per target, the predicted vs real file size and decode speed, and ends
with one line ``RESULT {json}``: size_pred_err / speed_pred_err are the worst relative errors over the
targets, stages the seconds per stage (summed over targets). A re-run resumes finished stages.
"""

from __future__ import annotations

import argparse
import json

from amoeba_export.deploy import STAGES, DeployOptions, deploy_demo, load_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["laptop", "android-8gb"])
    p.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", help="work folder (default: the cache's deploy-demo)")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--finetune-steps", type=int, default=0)
    args = p.parse_args()
    budgets = {k: float(v) for k, v in (b.split("=", 1) for b in args.budget)}
    reports = deploy_demo(targets=tuple(args.targets), out=args.out, budgets=budgets or None,
                          finetune_steps=args.finetune_steps, options=DeployOptions(eval_tokens=args.eval_tokens))
    stages = dict.fromkeys(STAGES, 0.0)
    size_err = speed_err = 0.0
    per_target = {}
    for name, report in zip(args.targets, reports):
        m = load_manifest(report.parent.parent)["stages"]
        print(f"\n{name}: chose {m['search']['chosen']}")
        for s in STAGES:
            print(f"  {s:<9} {m[s]['seconds']:8.1f} s")
            stages[s] += m[s]["seconds"]
        r = m["report"]
        print(f"  file size  predicted {r['predicted_file_bytes'] / 1e6:.3f} MB, real {r['file_bytes'] / 1e6:.3f} MB "
              f"({100 * r['size_pred_err']:.2f} %)")
        print(f"  decode     predicted {r['predicted_decode_tok_s']:.1f} tok/s, measured {r['decode_tok_s']:.1f} "
              f"tok/s ({100 * r['speed_pred_err']:.1f} %)")
        size_err, speed_err = max(size_err, r["size_pred_err"]), max(speed_err, r["speed_pred_err"])
        per_target[name] = {"chosen": m["search"]["chosen"], "size_pred_err": r["size_pred_err"],
                            "speed_pred_err": r["speed_pred_err"], "report": str(report)}
    print("RESULT " + json.dumps({"size_pred_err": size_err, "speed_pred_err": speed_err,
                                  "stages": {k: round(v, 2) for k, v in stages.items()}, "targets": per_target}))


if __name__ == "__main__":
    main()
