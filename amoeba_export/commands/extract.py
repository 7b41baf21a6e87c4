"""``amoeba extract``: one shape of a plan or trained elastic checkpoint as a plain HF folder."""

from __future__ import annotations

import argparse

from ..precision import PRECISIONS
from ..reconstruct.modes import COMPENSATE_MODES
from ..shape import PARAMS_KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="plan folder (amoeba plan) or elastic checkpoint (amoeba train)")
    p.add_argument("--out", required=True, help="subnet folder to write")
    p.add_argument("--depth", type=int, help="number of layers to keep")
    p.add_argument("--width", type=float, default=1.0, help="width ratio in (0, 1]")
    p.add_argument("--mode", choices=("global", "uniform"), default=None,
                   help="global: per-layer widths by importance; uniform: the same ratio in every layer "
                        "(default: global with --depth/--width; with --params the better of both)")
    p.add_argument("--params", type=float, help="pick the largest plan shape with at most this many parameters")
    p.add_argument("--params-kind", choices=PARAMS_KINDS, default="total",
                   help="what --params counts: total (default: every parameter, as a model card counts them and as "
                        "file size and memory follow) or transformer (without embedding and lm_head, which no shape "
                        "changes: what compute follows; with a large vocabulary, half the total keeps little of "
                        "the transformer)")
    p.add_argument("--round-to", type=int, help="MLP widths are multiples of this (e.g. 256 for GGUF k-quants)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compensate", choices=COMPENSATE_MODES, default=None,
                      help="how narrowed layers make up for removed channels: lstsq (refit kept o_proj/down_proj "
                           "columns + bias by least squares), mean (bias of the removed channels' mean), none "
                           "(default: the plan's, lstsq)")
    comp.add_argument("--no-compensate", dest="compensate", action="store_const", const="none")
    maps = p.add_mutually_exclusive_group()
    maps.add_argument("--depth-maps", dest="depth_maps", action="store_true", default=None,
                      help="replace each run of removed layers by a linear map fitted on calibration text and "
                           "merged into the preceding down_proj (default: the plan's, on)")
    maps.add_argument("--no-depth-maps", dest="depth_maps", action="store_false")
    p.add_argument("--depth-map-tokens", type=int,
                   help="calibration tokens the depth maps are fitted on (default: the plan's, 8192; up to the "
                        "plan's 16384 fit better and take proportionally longer; more than the plan holds is an "
                        "error)")
    p.add_argument("--fit-precision", choices=PRECISIONS, default="auto",
                   help="matmuls of the depth maps' calibration pass (default auto: bfloat16 where this machine runs "
                        "it faster than float32, measured once; the maps are solved in float64 either way). "
                        "float32 gives the same maps on every machine")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    import time

    from ..artifacts import read_meta
    from ..extract import extract_subnet, source_plan

    params = _params(args)
    start = time.perf_counter()
    if params is not None:  # the plan's dims are cheap to read (no weights)
        params = source_plan(args.source).dims.total_budget(params, args.params_kind)
    out = extract_subnet(args.source, args.out, depth=args.depth, width=args.width, mode=args.mode,
                         params=params, compensate=args.compensate, depth_maps=args.depth_maps,
                         depth_map_tokens=args.depth_map_tokens, fit_precision=args.fit_precision,
                         round_to=args.round_to, force=args.force)
    meta = read_meta(out)
    kind = f"stock {meta['model_type']}" if meta["stock"] else "amoeba_llama"
    rec = meta.get("reconstruction", {})
    maps = (f", {len(rec['depth_maps'])} depth map(s) fitted on {rec['calibration_tokens']:,} tokens in "
            f"{rec['fit_seconds']:.1f} s ({rec['fit_precision']} pass)" if rec.get("depth_maps") else "")
    dims = source_plan(args.source).dims
    emb = dims.embedding_params
    counts = (f"{meta['params']:,} parameters ({meta['params'] - emb:,} transformer + {emb:,} "
              f"{'embedding' if dims.tied_embeddings else 'embedding and lm_head'})")
    budget = f", budget {args.params:,.0f} {args.params_kind}" if args.params is not None else ""
    print(f"wrote {out}: {meta['shape']['name']}, {counts}{budget}, {kind} checkpoint, "
          f"width compensation {rec.get('width', 'none')}{maps}, {time.perf_counter() - start:.2f} s")
    pick = meta["shape"].get("meta", {}).get("pick")
    if pick:
        final = pick.get("final")
        ppl, tokens = ((final["calibration_ppl"][0], final["calibration_tokens"]) if final
                       else (pick["calibration_ppl"], pick["calibration_tokens"]))
        again = (f", then the best {len(final['shapes'])} again on {final['calibration_tokens']:,} tokens"
                 if final else "")
        print(f"  picked by calibration perplexity {ppl:.2f} ({tokens:,} tokens): ranked {pick['ranked']} of "
              f"{pick['candidates']} candidate shapes{_measured(pick)} on {pick['calibration_tokens']:,} tokens"
              f"{again}, in {pick['seconds']:.1f} s")
    if meta.get("not_stock_because"):
        print(f"  amoeba_llama (loads with trust_remote_code; model code travels in the folder) because "
              f"{meta['not_stock_because']}")
    return 0


def _measured(pick: dict) -> str:
    """How many distinct shapes the ranking ran, when fewer than it ranked (both width modes can give one shape;
    meta from before it was recorded says nothing)."""
    n = pick.get("measured", pick["ranked"])
    return f" ({n} distinct)" if n < pick["ranked"] else ""


def _params(args: argparse.Namespace) -> int | None:
    """``--params`` as an integer budget; it picks depth and width, so giving those too is a contradiction."""
    import math

    from ..errors import ShapeError

    if args.params is None:
        return None
    if args.depth is not None or args.width != 1.0:
        raise ShapeError("--params picks the depth and width itself; --depth/--width cannot be given with it",
                         fix="pass either --params, or --depth and --width")
    if not math.isfinite(args.params) or args.params < 1:
        raise ShapeError(f"--params must be a positive, finite parameter count, got {args.params:g}",
                         fix="pass e.g. --params 60e6")
    return int(args.params)

