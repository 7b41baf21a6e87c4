"""``amoeba plan``: depth tables (DP + baselines) and width rankings for a model."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plan import PlanConfig
    from ..plan.config import WIDTH_ORDERS
    from ..reconstruct.modes import COMPENSATE_MODES

    d = PlanConfig()
    p.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    p.add_argument("--out", required=True, help="plan folder to write")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--width-tokens", type=int, default=d.width_tokens, help="calibration tokens for importance")
    p.add_argument("--depth-tokens", type=int, default=d.depth_tokens, help="calibration tokens per DP evaluation")
    p.add_argument("--depth-seq-len", type=int, default=d.depth_seq_len, help="row length of the DP's batch")
    p.add_argument("--depth-metric", default=d.depth_metric,
                   help="what the depth DP minimises: perplexity (calibration loss) or mc:<BIG-bench task> "
                        "(multiple-choice error, e.g. mc:cause_and_effect/one_sentence)")
    p.add_argument("--max-removed", type=float, default=d.max_removed, help="most layers removed (fraction)")
    p.add_argument("--round-to", type=int, default=d.round_to, help="MLP widths are multiples of this")
    p.add_argument("--width-order", choices=WIDTH_ORDERS, default=d.width_order,
                   help="which MLP channels a narrower layer keeps: refit (least-squares elimination) or flap")
    p.add_argument("--global-spread", type=float, default=d.global_spread,
                   help="global width mode keeps each layer within width × (1 ± this) of its parameters")
    p.add_argument("--compensate", choices=COMPENSATE_MODES, default=d.compensate,
                   help="extraction's default width compensation (lstsq, mean or none)")
    p.add_argument("--no-compensate", dest="compensate", action="store_const", const="none",
                   help="extract without compensation by default")
    p.add_argument("--no-depth-maps", action="store_true", help="extract without depth maps by default")
    p.add_argument("--force", action="store_true", help="replace an existing plan folder")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..plan import PlanConfig, build_plan

    if Path(args.out).exists() and not args.force:
        raise OutputExistsError(f"output folder {args.out} already exists", fix="pass --force to replace it")
    config = PlanConfig(seq_len=args.seq_len, width_tokens=args.width_tokens, depth_tokens=args.depth_tokens,
                        depth_seq_len=args.depth_seq_len, depth_metric=args.depth_metric,
                        max_removed=args.max_removed, round_to=args.round_to, global_spread=args.global_spread,
                        width_order=args.width_order,
                        compensate=args.compensate, depth_maps=not args.no_depth_maps)
    plan = build_plan(args.model, config)
    plan.save(args.out, force=args.force)
    s = plan.stats
    print(f"plan written to {args.out}: {s['dp_evaluations']} DP evaluations in {s['dp_seconds']:.1f} s, "
          f"{s['total_seconds']:.1f} s in all; depths {min(plan.depths)}..{max(plan.depths)}")
    return 0
