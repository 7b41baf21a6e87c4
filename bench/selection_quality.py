"""Issue 2: does knowledge-preserving selection beat the baselines? (SmolLM2-135M, held-out split)

Depth: perplexity with 25 % and 50 % of the layers removed, DP vs Block Influence vs drop-last.
Width: ratios 0.75 / 0.5, global vs uniform, with and without bias compensation.
All shapes are run by the elastic model (identical to the extracted subnet within 1e-4).

Held-out rows are spread evenly over the split (alice29.txt and the held-out Wikipedia articles), not taken
from its start (alice29's Gutenberg header and table of contents).

    python bench/selection_quality.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json

import torch

from amoeba_export.data import chunks, split_tokens
from amoeba_export.demo import ensure_plan
from amoeba_export.evaluation.perplexity import perplexity
from amoeba_export.modelio import load_tokenizer, resolve_model
from amoeba_export.paths import cache_subdir
from amoeba_export.plan import load_elastic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per perplexity")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    plan_dir = cache_subdir("demo") / "plan"
    plan = ensure_plan(model_dir, plan_dir)
    rows = chunks(split_tokens("heldout", load_tokenizer(model_dir)), 512, args.tokens, spread=True)
    elastic, _ = load_elastic(plan_dir, compensate=True)
    attn_means = [b.attn_in_mean for b in elastic.layers]
    mlp_means = [b.mlp_in_mean for b in elastic.layers]

    def ppl(shape, compensate: bool = False) -> float:
        elastic.set_compensation(attn_means if compensate else None, mlp_means if compensate else None)
        with torch.no_grad():
            return perplexity(lambda ids: elastic(ids, shape), rows)

    n = plan.dims.num_layers
    result: dict[str, object] = {"full_ppl": ppl(plan.full_shape()), "tokens": int(rows.numel())}
    print(f"full model: held-out perplexity {result['full_ppl']:.3f} over {rows.numel()} tokens")
    print(f"\n{'layers removed':<16} {'DP':>9} {'Block Infl.':>12} {'drop-last':>10}   DP gain vs best baseline")
    for frac in (0.25, 0.50):
        depth = n - round(n * frac)
        row = {f"{m}_ppl": ppl(plan.shape(depth, 1.0, method=method))
               for m, method in (("dp", "dp"), ("bi", "block_influence"), ("drop_last", "drop_last"))}
        result[f"depth_{int(frac * 100)}"] = row | {"depth": depth}
        best_base = min(row["bi_ppl"], row["drop_last_ppl"])
        print(f"{n - depth:>2} of {n} ({frac:.0%})  {row['dp_ppl']:>9.2f} {row['bi_ppl']:>12.2f} "
              f"{row['drop_last_ppl']:>10.2f}   {best_base / row['dp_ppl']:.2f}× lower perplexity")

    print(f"\n{'width ratio':<12} {'global':>9} {'uniform':>9} {'global+comp':>12} {'uniform+comp':>13}")
    width: dict[str, dict[str, float]] = {}
    for ratio in (0.75, 0.5):
        cells = {}
        for comp in (False, True):
            for mode in ("global", "uniform"):
                cells[mode + ("_comp" if comp else "")] = ppl(plan.shape(n, ratio, mode), compensate=comp)
        width[str(ratio)] = cells
        print(f"{ratio:<12} {cells['global']:>9.2f} {cells['uniform']:>9.2f} {cells['global_comp']:>12.2f} "
              f"{cells['uniform_comp']:>13.2f}")
    result["width"] = width
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
