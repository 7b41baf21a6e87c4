"""Instant extraction: a shape of a plan (or trained elastic checkpoint) as a plain HF folder.

Uniform widths give a stock checkpoint (``LlamaForCausalLM`` etc.) that loads with no amoeba code;
per-layer widths give an ``amoeba_llama`` checkpoint whose model code travels inside the folder.
Weights are written directly from the sliced (and, after fine-tuning, LoRA-merged) elastic weights.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES, subnet_class
from .artifacts import atomic_dir, read_meta, write_json, write_meta
from .elastic import ElasticLM
from .errors import OutputExistsError, ShapeError
from .identity import stage_identity
from .precision import check as check_precision
from .reconstruct import DepthMaps
from .shape import Shape

# Files of the source folder that are the model itself (everything else — tokenizer, chat template,
# generation config — is copied along).
MODEL_FILES = {"config.json", "meta.json", "model.safetensors.index.json"}


@torch.no_grad()
def subnet_state_dict(elastic: ElasticLM, shape: Shape, maps: DepthMaps | None = None,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """Weights of ``shape`` in transformers' naming and head order, plus which optional biases exist.

    ``o_proj``/``down_proj`` come from :meth:`ElasticBlock.output_projection` (sliced, refit, compensated);
    a depth map ``T`` of a kept layer is merged into its ``down_proj``: ``W ← T W``, ``b ← T b``."""
    dims = elastic.dims
    hd = dims.head_dim
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": elastic.embed_tokens.weight,
                                   "model.norm.weight": elastic.norm.weight}
    if not dims.tied_embeddings:
        sd["lm_head.weight"] = elastic.lm_head.weight
    flags = {"qkv_bias": False, "o_proj_bias": False, "down_proj_bias": False, "qk_norm": False}
    mlp_maps = {} if maps is None else maps.maps
    for new, (layer, q, kv, m) in enumerate(zip(shape.layers, shape.q_heads, shape.kv_heads, shape.mlp)):
        block = elastic.layers[layer]
        heads = elastic._head_channels(elastic.group_major_heads(q, kv))
        p = f"model.layers.{new}."
        sd[p + "input_layernorm.weight"] = block.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
        sd[p + "self_attn.q_proj.weight"] = block.q_proj.effective_weight(q * hd)[heads]
        sd[p + "self_attn.k_proj.weight"] = block.k_proj.effective_weight(kv * hd)
        sd[p + "self_attn.v_proj.weight"] = block.v_proj.effective_weight(kv * hd)
        if block.q_norm is not None:  # Qwen3: one per-head norm shared by all heads, kept whole
            flags["qk_norm"] = True
            sd[p + "self_attn.q_norm.weight"] = block.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = block.k_norm.weight
        sd[p + "mlp.gate_proj.weight"] = block.gate_proj.effective_weight(m)
        sd[p + "mlp.up_proj.weight"] = block.up_proj.effective_weight(m)
        if block.q_proj.bias is not None:
            flags["qkv_bias"] = True
            sd[p + "self_attn.q_proj.bias"] = block.q_proj.bias[: q * hd][heads]
            sd[p + "self_attn.k_proj.bias"] = block.k_proj.bias[: kv * hd]
            sd[p + "self_attn.v_proj.bias"] = block.v_proj.bias[: kv * hd]
        o_weight, o_bias = block.output_projection("o_proj", q * hd)
        sd[p + "self_attn.o_proj.weight"] = o_weight[:, heads]
        d_weight, d_bias = block.output_projection("down_proj", m)
        if layer in mlp_maps:
            t = mlp_maps[layer].to(d_weight.dtype)
            d_weight, d_bias = t @ d_weight, (None if d_bias is None else t @ d_bias)
        sd[p + "mlp.down_proj.weight"] = d_weight
        for key, bias, flag in (("self_attn.o_proj.bias", o_bias, "o_proj_bias"),
                                ("mlp.down_proj.bias", d_bias, "down_proj_bias")):
            if bias is not None:
                sd[p + key] = bias
                flags[flag] = True
    # A bias flag applies to every layer: layers that had nothing removed get zero biases.
    for new in range(shape.depth):
        p = f"model.layers.{new}."
        if flags["o_proj_bias"]:
            sd.setdefault(p + "self_attn.o_proj.bias", torch.zeros(dims.hidden_size))
        if flags["down_proj_bias"]:
            sd.setdefault(p + "mlp.down_proj.bias", torch.zeros(dims.hidden_size))
    return {k: v.detach().float().contiguous() for k, v in sd.items()}, flags


def subnet_config(source_config: Any, shape: Shape, flags: dict[str, bool]) -> tuple[dict[str, Any], str]:
    """config.json contents: a stock config when the shape allows it (``architectures.subnet_class``), else
    ``amoeba_llama``; and why it is ``amoeba_llama`` ("" for a stock config)."""
    cfg = source_config.to_dict()
    for key in ("auto_map", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version",
                "quantization_config", "layer_num_attention_heads", "layer_num_key_value_heads",
                "layer_intermediate_sizes", "qkv_bias", "o_proj_bias", "down_proj_bias", "qk_norm"):
        cfg.pop(key, None)
    q, kv, m = max(shape.q_heads), max(shape.kv_heads), max(shape.mlp)
    cfg.update(num_hidden_layers=shape.depth, num_attention_heads=q, num_key_value_heads=kv,
               intermediate_size=m, head_dim=source_config.head_dim if hasattr(source_config, "head_dim")
               and source_config.head_dim else source_config.hidden_size // source_config.num_attention_heads,
               dtype="float32")
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in shape.layers]
    chosen = subnet_class(cfg["model_type"], uniform=shape.uniform, hidden_size=cfg["hidden_size"], q_heads=q,
                          output_bias=flags["o_proj_bias"] or flags["down_proj_bias"])
    if chosen.stock:
        if chosen.model_type != cfg["model_type"]:
            # A compensated Qwen2/Mistral subnet as a stock Llama: the same function (Qwen2 is a Llama with q/k/v
            # biases), and Llama's bias flags hold the o_proj/down_proj biases the source class has no slot for.
            for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
                cfg.pop(key, None)
        if chosen.bias_flags:
            cfg.update(attention_bias=True, mlp_bias=flags["down_proj_bias"])
        cfg.update(model_type=chosen.model_type, architectures=[ARCHITECTURES[chosen.model_type].hf_class])
        return cfg, ""
    for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        cfg.pop(key, None)
    cfg.update(model_type="amoeba_llama", architectures=["AmoebaLlamaForCausalLM"],
               layer_num_attention_heads=list(shape.q_heads), layer_num_key_value_heads=list(shape.kv_heads),
               layer_intermediate_sizes=list(shape.mlp), attention_bias=False, mlp_bias=False, **flags,
               auto_map={"AutoConfig": "configuration_amoeba_llama.AmoebaLlamaConfig",
                         "AutoModelForCausalLM": "modeling_amoeba_llama.AmoebaLlamaForCausalLM"})
    return cfg, chosen.reason


def _stock_biases(sd: dict[str, torch.Tensor], cfg: dict[str, Any], shape: Shape, hd: int) -> None:
    """Zero biases a stock Llama config with attention_bias/mlp_bias expects on every projection."""
    h = cfg["hidden_size"]
    for i, (q, kv, m) in enumerate(zip(shape.q_heads, shape.kv_heads, shape.mlp)):
        p = f"model.layers.{i}."
        if cfg.get("attention_bias"):
            for name, size in (("q_proj", q * hd), ("k_proj", kv * hd), ("v_proj", kv * hd), ("o_proj", h)):
                sd.setdefault(f"{p}self_attn.{name}.bias", torch.zeros(size))
        if cfg.get("mlp_bias"):
            for name, size in (("gate_proj", m), ("up_proj", m), ("down_proj", h)):
                sd.setdefault(f"{p}mlp.{name}.bias", torch.zeros(size))


def write_subnet(elastic: ElasticLM, shape: Shape, out: str | Path, *, source_dir: str | Path,
                 meta: dict[str, Any] | None = None, force: bool = False, started: float | None = None) -> Path:
    """Write ``shape`` of ``elastic`` as an HF folder (tokenizer copied from ``source_dir``).

    ``started``: when the whole extraction began (``time.perf_counter()``), for ``total_seconds`` in the meta;
    ``extract_seconds`` is this call's own (depth-map fit, width solves, writing)."""
    from safetensors.torch import save_file

    from . import hf

    start = time.perf_counter()
    shape.validate(elastic.dims)
    maps = elastic.depth_maps(shape)  # one calibration pass of the subnet when depth reconstruction is on
    sd, flags = subnet_state_dict(elastic, shape, maps)
    cfg, not_stock = subnet_config(elastic.config, shape, flags)
    if cfg["model_type"] != "amoeba_llama":
        _stock_biases(sd, cfg, shape, elastic.dims.head_dim)
    source_dir = Path(source_dir)
    with atomic_dir(out, force=force) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", cfg)
        for f in source_dir.iterdir():
            if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith((".safetensors", ".py", ".bin")):
                shutil.copy2(f, tmp / f.name)
        if cfg["model_type"] == "amoeba_llama":
            for name in hf.MODEL_FILES:
                shutil.copy2(Path(hf.__file__).parent / name, tmp / name)
        params = sum(v.numel() for k, v in sd.items())
        write_meta(tmp, {
            "kind": "hf_model", "version": 1, "subnet": True, "shape": shape.to_dict(),
            "params": params, "stock": cfg["model_type"] != "amoeba_llama", "model_type": cfg["model_type"],
            **({"not_stock_because": not_stock} if not_stock else {}),
            "extract_seconds": round(time.perf_counter() - start, 3),
            **({"total_seconds": round(time.perf_counter() - started, 3)} if started is not None else {}),
            "reconstruction": {"width": elastic.compensation_mode,
                               **(maps.describe() if maps is not None else {"depth_maps": []})},
            **(meta or {}),
        })
    return Path(out)


def load_source(source: str | Path, *, compensate: str | bool | None = None, depth_maps: bool | None = None,
                depth_map_tokens: int | None = None, plan=None):
    """``(elastic, plan, meta)`` of a plan folder or a trained elastic checkpoint (``plan``: already loaded).

    ``compensate``/``depth_maps``: the reconstruction (None: the plan's, or for a checkpoint what it was trained
    with). A checkpoint's depth maps are fitted on its LoRA-merged weights, per shape, at extraction."""
    meta = read_meta(source)
    if meta.get("kind") == "elastic":
        from .finetune import load_trained_elastic

        elastic, plan, _ = load_trained_elastic(source, compensate=compensate, depth_maps=depth_maps,
                                                depth_map_tokens=depth_map_tokens)
        return elastic, plan, meta
    from .plan import load_elastic

    read_meta(source, kind="plan")
    elastic, plan = load_elastic(source, compensate=compensate, plan=plan, depth_maps=depth_maps,
                                 depth_map_tokens=depth_map_tokens)
    return elastic, plan, meta


def source_plan(source: str | Path):
    """The plan behind a plan folder or an elastic checkpoint (cheap: no model weights)."""
    from .plan import Plan

    meta = read_meta(source)
    if meta.get("kind") == "elastic":
        return Plan.load(meta["plan_dir"])
    read_meta(source, kind="plan")
    return Plan.load(source)


def prepare_shape(elastic: ElasticLM, shape: Shape) -> None:
    """Trained elastic models mix their LoRA experts for the shape before weights are read."""
    merge = getattr(elastic, "merge_for_shape", None)
    if merge is not None:
        merge(shape)


def extract_subnet(source: str | Path, out: str | Path, *, depth: int | None = None, width: float = 1.0,
                   mode: str | None = None, params: int | None = None, compensate: str | bool | None = None,
                   depth_maps: bool | None = None, depth_map_tokens: int | None = None, fit_precision: str = "auto",
                   round_to: int | None = None, method: str = "dp", force: bool = False) -> Path:
    """``amoeba extract``: pick a shape by (depth, width) or by parameter budget and write it.

    ``fit_precision``: the depth maps' calibration pass (:data:`amoeba_export.precision.PRECISIONS`)."""
    start = time.perf_counter()
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output folder {out} already exists", fix="pass --force to replace it")
    check_precision(fit_precision)  # fail on a bad name or an impossible shape before loading any weights
    plan = source_plan(source)
    if params is None:
        if depth is None:
            raise ShapeError("no shape given", fix="pass --depth and --width, or --params")
        shape = plan.shape(depth, width, mode or "global", method=method, round_to=round_to)
    elastic, plan, source_meta = load_source(source, compensate=compensate, depth_maps=depth_maps,
                                             depth_map_tokens=depth_map_tokens, plan=plan)
    if elastic.depth_reconstruction is not None:
        elastic.set_depth_reconstruction(dataclasses.replace(elastic.depth_reconstruction, precision=fit_precision))
    if params is not None:
        shape = pick_for_params(elastic, plan, params, mode)
    prepare_shape(elastic, shape)
    path = write_subnet(elastic, shape, out, source_dir=plan.model_dir, force=force,
                        meta={"source": str(source), "source_kind": source_meta.get("kind"),
                              "compensated": elastic.compensating, "source_identity": stage_identity(source)},
                        started=start)
    return path


def pick_for_params(elastic: ElasticLM, plan, params: int, mode: str | None = None, *,
                    calibration_tokens: int = 512, stride: int = 3, finalists: int = 3,
                    final_tokens: int = 2048) -> Shape:
    """Among the widest shape of each depth within ``params`` — in ``mode``, or in every width mode when None —
    the one with the best calibration loss. ``shape.meta["pick"]`` records what was ranked and its cost.

    Coarse to fine over depth: every ``stride``-th depth of each mode is scored, then the depths between the
    two best and their neighbours. At a fixed budget the loss changes smoothly with depth (SmolLM2-135M at
    half its parameters, uniform, 512 tokens: 173-186 from 23 to 28 layers, 201-221 from 18 to 22), so this
    finds the best within the scores' noise with about half the forward passes (``stride=1``: all of them).

    Then the best ``finalists`` distinct shapes are ranked again on ``final_tokens`` calibration tokens (rows spread
    over the split) and the best of that ranking is the pick: 512 tokens separate shapes far apart, but close ones
    trade places from one row to the next. (SmolLM2-135M at 75 %: the 512 tokens put ``d30-w0.6562-uniform`` first,
    2,048 put ``d30-w0.6599-global`` first, and held-out text agrees with the larger ranking: 55.57 vs 53.39 on the
    demo's 2,048 held-out tokens.) ``finalists=1`` keeps the first ranking's pick. ``pick["calibration_ppl"]`` is
    the first ranking's best; ``pick["final"]`` holds the second ranking."""
    from .data import measurement_rows
    from .modelio import load_tokenizer
    from .plan.plan import WIDTH_MODES
    from .plan.select import rank_shapes

    start = time.perf_counter()
    # Both modes by default: once kept columns are refit, uniform widths often beat the global FLAP allocation
    # (width 0.5 on SmolLM2-135M: 104.9 vs 205.4) but not always (0.75: 56.7 vs 46.7), so the budget alone
    # should not fix the mode.
    by_mode: list[list[Shape]] = []
    problems = []
    for m in WIDTH_MODES if mode is None else (mode,):
        try:
            by_mode.append(sorted(plan.shapes_for_params(params, m), key=lambda s: s.depth))
        except ShapeError as exc:
            problems.append(exc)
    if not by_mode:
        raise problems[0]
    tokenizer = load_tokenizer(plan.model_dir)
    rows = measurement_rows("calibration", tokenizer, 256, calibration_tokens).rows
    scores: dict[tuple[int, int], float] = {}  # (mode index, position in its depth order) → perplexity
    measured: dict[tuple, float] = {}  # widths → perplexity: each distinct shape runs once

    def score(keys: set[tuple[int, int]]) -> None:
        todo = sorted(keys - set(scores))
        # Both modes give the same shape where a depth's widest shape within the budget is full width (every
        # depth up to 20 of SmolLM2-135M at 75 %): measured once, scored for both.
        new = {_widths(s): s for s in (by_mode[m][i] for m, i in todo) if _widths(s) not in measured}
        # Ranked with width compensation (a closed-form solve) but without depth maps: fitting maps for every
        # candidate would cost a calibration pass each; the chosen shape gets its maps when extracted.
        with elastic.without_depth_maps():
            ranked = rank_shapes(elastic, list(new.values()), rows)
        measured.update({_widths(shape): ppl for ppl, shape in ranked})
        scores.update({(m, i): measured[_widths(by_mode[m][i])] for m, i in todo})

    score({(m, i) for m, shapes in enumerate(by_mode) for i in range(len(shapes))
           if i % stride == 0 or i == len(shapes) - 1})
    for m, i in sorted(scores, key=scores.get)[:2]:
        score({(m, j) for j in range(i - stride + 1, i + stride) if 0 <= j < len(by_mode[m])})
    m, i = min(scores, key=scores.get)
    best = by_mode[m][i]
    pick = {"candidates": sum(map(len, by_mode)), "ranked": len(scores), "measured": len(measured),
            "calibration_tokens": int(rows.numel()), "calibration_ppl": round(scores[m, i], 4)}
    # Distinct shapes in the first ranking's order (both modes can give one shape: it is one finalist, under the
    # name it ranked first with).
    distinct: dict[tuple, Shape] = {}
    for m, i in sorted(scores, key=scores.get):
        distinct.setdefault(_widths(by_mode[m][i]), by_mode[m][i])
    leaders = list(distinct.values())
    if finalists > 1 and len(leaders) > 1 and final_tokens > calibration_tokens:
        final_start = time.perf_counter()
        final_rows = measurement_rows("calibration", tokenizer, 256, final_tokens).rows
        with elastic.without_depth_maps():
            final = rank_shapes(elastic, leaders[:finalists], final_rows)
        best = final[0][1]
        pick["final"] = {"shapes": [s.name for _, s in final], "calibration_tokens": int(final_rows.numel()),
                         "calibration_ppl": [round(p, 4) for p, _ in final],
                         "seconds": round(time.perf_counter() - final_start, 2)}
    pick["seconds"] = round(time.perf_counter() - start, 2)
    return dataclasses.replace(best, meta={**best.meta, "pick": pick})


def _widths(shape: Shape) -> tuple:
    """What a shape computes (kept layers and their widths), whatever its name says about how it was chosen."""
    return shape.layers, shape.q_heads, shape.kv_heads, shape.mlp
