"""Which ExecuTorch quantization recipe keeps SmolLM2-135M accurate? A sweep in torchao eager (minutes, no lowering).

Each recipe (the shipped ones and variants with more projections kept in 8 bits) is applied with
``apply_recipe`` to the exportable static-cache module and compared with the fp32 module on held-out text:
top-1 agreement, mean KL(fp32 || quantized) and perplexity ratio — the validator's metrics. The lowered
``.pte`` matches torchao eager within the tolerances tests/backends/test_executorch.py checks, so this
picks recipes without paying ≈ 10 min of XNNPACK lowering each; bench/executorch_speed.py then measures the
chosen ones as ``.pte`` files. Ends with one line ``RESULT {json}``.

    python bench/executorch_recipe_sweep.py [--tokens 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

ATTN_QKO = ("v_proj", "gate_proj", "up_proj", "down_proj")  # kept 8-bit by 8da4w-attn


def variants():
    """name -> (recipe, GPTQ settings): the settings matter only to the GPTQ recipes (None: the shipped ones)."""
    from amoeba_export.backends.executorch.gptq import GPTQSettings
    from amoeba_export.backends.executorch.recipes import RECIPES

    base, gptq = RECIPES["8da4w"], RECIPES["8da4w-gptq"]
    plain = {
        "8da4w-head4": RECIPES["8da4w-head4"],
        "8da4w": base,
        "8da4w + down 8-bit": dataclasses.replace(base, keep_8bit=("down_proj",)),
        "8da4w + down,v 8-bit": dataclasses.replace(base, keep_8bit=("down_proj", "v_proj")),
        "8da4w + down,o,v 8-bit": dataclasses.replace(base, keep_8bit=("down_proj", "o_proj", "v_proj")),
        "8da4w-attn (q,k,o int4)": RECIPES["8da4w-attn"],
        "q,k int4 only": dataclasses.replace(base, keep_8bit=ATTN_QKO + ("o_proj",)),
        "8da8w": RECIPES["8da8w"],
        # GPTQ rounding on the same grids (calibration split, never the held-out rows measured here)
        "8da4w-gptq": gptq,
        "8da4w-gptq + down 8-bit": dataclasses.replace(gptq, keep_8bit=("down_proj",)),
        "8da4w-attn-gptq": RECIPES["8da4w-attn-gptq"],
        # the MLP's gate/up are what int4 cannot hold (table above): keep only those in 8 bits, the rest GPTQ int4
        "8da4w-gptq + gate,up 8-bit": dataclasses.replace(gptq, keep_8bit=("gate_proj", "up_proj")),
        "8da4w-gptq + gate,up,v 8-bit": dataclasses.replace(gptq, keep_8bit=("gate_proj", "up_proj", "v_proj")),
    }
    out = {name: (recipe, None) for name, recipe in plain.items()}
    out["8da4w-gptq, 16,384 tokens"] = (dataclasses.replace(gptq, calibration_tokens=16384),
                                        GPTQSettings(damping=0.01))
    # what chose the shipped GPTQ settings (gptq.py's module doc and GPTQSettings quote these rows)
    for damping in (0.01, 0.3, 1.0):
        out[f"8da4w-gptq, damping {damping}"] = (gptq, GPTQSettings(damping=damping))
    for damping in (0.01, 0.3):
        out[f"8da4w-attn-gptq, damping {damping}"] = (RECIPES["8da4w-attn-gptq"], GPTQSettings(damping=damping))
    # at the damping (0.01) these were measured with, as gptq.py quotes them
    out["8da4w-gptq, no act-order"] = (gptq, GPTQSettings(damping=0.01, act_order=False))
    out["8da4w-gptq, updated groups"] = (gptq, GPTQSettings(damping=0.01, act_order=False, groups="updated"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens (rows of 256, as the validator)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--only", help="variant names separated by semicolons (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from amoeba_export.backends.executorch.recipes import RECIPES
    from amoeba_export.data import measurement_rows
    from amoeba_export.deploy.sizing import executorch_weight_bytes, subnet_tensors
    from amoeba_export.evaluation.recipe_accuracy import measure, reference
    from amoeba_export.modelio import load_model, load_tokenizer
    from amoeba_export.resources import default_model_dir
    from amoeba_export.shape import ModelDims, Shape

    hf = default_model_dir()
    rows = measurement_rows("heldout", load_tokenizer(hf), 256, args.tokens).rows
    model = load_model(hf)
    dims = ModelDims.from_config(model.config)
    tensors = subnet_tensors(dims, Shape.full(dims), compensate=False)
    ref = reference(model, rows)
    results = []
    print(f"{'recipe':<32} {'weights MB':>10} {'top1':>6} {'KL':>7} {'ppl ratio':>9}")
    wanted = set(args.only.split(";")) if args.only else None
    for name, (recipe, settings) in variants().items():
        if wanted is not None and name not in wanted:
            continue
        m = measure(hf, recipe, rows, ref=ref, gptq=settings)
        row = {"recipe": name, "keep_8bit": list(recipe.keep_8bit),
               # priced for shipped recipes only (sizing looks recipes up by name)
               "weight_mb": executorch_weight_bytes(tensors, recipe.name, tied=dims.tied_embeddings) / 1e6
               if RECIPES.get(recipe.name) == recipe else None,
               "top1": m["top1"], "kl": m["kl"], "ppl_ratio": m["ppl_ratio"]}
        results.append(row)
        mb = "-" if row["weight_mb"] is None else f"{row['weight_mb']:.1f}"
        print(f"{name:<32} {mb:>10} {row['top1']:6.3f} {row['kl']:7.4f} {row['ppl_ratio']:9.4f}", flush=True)
    print("RESULT " + json.dumps({"model": "SmolLM2-135M-Instruct", "tokens": int(rows.numel()),
                                  "threads": torch.get_num_threads(), "recipes": results}))


if __name__ == "__main__":
    main()
