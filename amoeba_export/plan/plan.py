"""Plans: the depth tables and width rankings a model's subnets are cut from.

A plan folder holds ``plan.json`` (config, depth tables of the DP and both baselines, search cost),
``width.safetensors`` (per-layer permutations, standardised unit scores, input means for compensation, and
the calibration rows the depth maps are fitted on), ``gram.safetensors`` (per layer, the input covariance of
``o_proj`` and ``down_proj`` in importance order, upper triangle, float32: ≈ 160 MB for SmolLM2-135M, read
only when least-squares compensation is used) and ``meta.json``. Any shape is then a cheap function of
(depth, width ratio, mode), and its reconstruction a closed-form solve plus one short calibration pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_dir, file_inventory, file_problems, read_meta, verify_files, write_json, write_meta
from ..errors import CheckpointError, ConfigError, ShapeError
from ..identity import content_identity
from ..reconstruct import (
    Compensator,
    DepthReconstruction,
    LayerCovariance,
    LeastSquaresCompensation,
    MeanCompensation,
)
from ..reconstruct.channels import pack_symmetric, unpack_symmetric
from ..reconstruct.modes import COMPENSATE_MODES
from ..shape import ModelDims, Shape
from .config import DEPTH_METHODS, PLAN_VERSION, WIDTH_MODES, PlanConfig  # noqa: F401  (re-exported)
from .width_importance import LayerRanking

GRAM_FILE = "gram.safetensors"


@dataclass(frozen=True)
class Plan:
    model_dir: str
    dims: ModelDims
    config: PlanConfig
    depth_tables: dict[str, dict[int, tuple[int, ...]]]
    rankings: tuple[LayerRanking, ...] = field(repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # The width calibration rows ([n, seq_len] token ids): depth maps are fitted on them at extraction.
    calibration_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # Per-layer input covariances; None on a loaded plan until ``covariances`` reads gram.safetensors.
    layer_covariances: tuple[LayerCovariance, ...] | None = field(default=None, repr=False, compare=False)

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def depth_table(self) -> dict[int, tuple[int, ...]]:
        return self.depth_tables["dp"]

    @property
    def depths(self) -> list[int]:
        return sorted(self.depth_table, reverse=True)

    @property
    def width_ratios(self) -> tuple[float, ...]:
        return self.config.width_ratios

    def full_shape(self) -> Shape:
        return Shape.full(self.dims)

    def smallest_shape(self, mode: str = "global") -> Shape:
        return self.shape(min(self.depths), min(self.width_ratios), mode)

    def grid(self, modes: tuple[str, ...] = ("global",)) -> list[Shape]:
        """Every (depth, width ratio, mode) shape the plan offers."""
        return [self.shape(d, w, m) for d in self.depths for w in self.width_ratios for m in modes]

    def shape(self, depth: int, width: float, mode: str = "global", *, method: str = "dp",
              round_to: int | None = None) -> Shape:
        """The subnet with ``depth`` layers and width ratio ``width`` (fraction of prunable width params)."""
        problems = []
        if method not in self.depth_tables:
            problems.append(f"unknown depth method {method!r} (supported are: {', '.join(self.depth_tables)})")
        elif depth not in self.depth_tables[method]:
            depths = sorted(self.depth_tables[method])
            problems.append(f"depth {depth} is not in the plan (it offers {depths[0]}..{depths[-1]} layers)")
        if not 0.05 <= width <= 1.0:
            problems.append(f"width ratio {width} not in [0.05, 1]")
        if mode not in WIDTH_MODES:
            problems.append(f"unknown width mode {mode!r} (supported are: {', '.join(WIDTH_MODES)})")
        if problems:
            raise ShapeError("; ".join(problems), fix="pick a depth and width the plan offers")
        layers = self.depth_tables[method][depth]
        r = round_to or self.config.round_to
        if width >= 1.0:
            widths = [(self.dims.num_heads, self.dims.num_kv_heads, self.dims.intermediate_size)] * len(layers)
        elif mode == "uniform":
            widths = [self._uniform_width(width, r)] * len(layers)
        else:
            widths = self._global_widths(layers, width, r)
        name = f"d{depth}-w{width:g}-{mode}" + ("" if method == "dp" else f"-{method}")
        shape = Shape(tuple(layers), tuple(w[0] for w in widths), tuple(w[1] for w in widths),
                      tuple(w[2] for w in widths), name=name,
                      meta={"depth": depth, "width": width, "mode": mode, "method": method})
        return shape.validate(self.dims)

    def _units(self) -> int:
        d = self.dims
        return d.group_size if d.group_size > 1 else d.num_heads

    def _heads_for_units(self, units: int) -> tuple[int, int]:
        d = self.dims
        if d.group_size > 1:
            return units * d.num_kv_heads, d.num_kv_heads
        return units, units

    def _round_mlp(self, channels: float, r: int) -> int:
        i = self.dims.intermediate_size
        return int(min(i, max(min(r, i), round(channels / r) * r)))

    def _uniform_width(self, width: float, r: int) -> tuple[int, int, int]:
        units = max(1, round(width * self._units()))
        q, kv = self._heads_for_units(units)
        return q, kv, self._round_mlp(width * self.dims.intermediate_size, r)

    def unit_costs(self) -> tuple[int, int]:
        """Parameters removed with one attention unit and with one MLP channel."""
        d = self.dims
        if d.group_size > 1:
            attn = 2 * d.num_kv_heads * d.head_dim * d.hidden_size  # q rows + o columns, every group
        else:
            attn = 4 * d.head_dim * d.hidden_size  # q, k, v rows + o columns
        return attn, 3 * d.hidden_size

    def _global_widths(self, layers: tuple[int, ...], width: float, r: int) -> list[tuple[int, int, int]]:
        """Rank heads and channels of the kept layers together; keep the best within the budget, each layer's
        width parameters held within ``width · (1 ± global_spread)`` of its own (see PlanConfig.global_spread).

        Every kept layer starts with one attention unit and ``min(r, intermediate)`` MLP channels. Then each
        layer takes its own best units up to its floor, and the rest are taken best score first across layers
        until the first that no longer fits the budget; a layer stops growing at the first of its units that
        would pass its cap. Within a layer, global score order is the layer's own order, so every quantity below
        is a prefix and the whole allocation is a few sorts and cumulative sums (integer, so comparisons are
        exact): a Python loop over every channel took ~45 ms a call, and choosing shapes for a parameter budget
        bisects the width of each depth (~250 calls on SmolLM2-135M)."""
        d = self.dims
        n_units, inter = self._units(), d.intermediate_size
        attn_cost, mlp_cost = self.unit_costs()
        min_mlp = min(r, inter)
        layer_params = n_units * attn_cost + inter * mlp_cost
        base = attn_cost + min_mlp * mlp_cost
        budget = width * len(layers) * layer_params
        spread = self.config.global_spread
        floor, cap = width * (1 - spread) * layer_params, width * (1 + spread) * layer_params
        scores, kinds, owners = [], [], []
        for layer in layers:
            rk = self.rankings[layer]
            scores += [rk.attn_scores[1:], rk.mlp_scores[min_mlp:]]
            kinds += [torch.zeros(n_units - 1, dtype=torch.bool), torch.ones(inter - min_mlp, dtype=torch.bool)]
            owners += [torch.full((n_units - 1,), layer), torch.full((inter - min_mlp,), layer)]
        order = torch.sort(torch.cat(scores), descending=True, stable=True).indices
        is_mlp, owner = torch.cat(kinds)[order], torch.cat(owners)[order]
        costs = torch.where(is_mlp, mlp_cost, attn_cost).to(torch.int64)
        # Each unit's layer total if that layer took all its units up to this one (a cumulative sum per layer,
        # in global order): grouping by layer with a stable sort keeps each layer's units in score order.
        by_layer = torch.sort(owner, stable=True).indices
        grouped = costs[by_layer].cumsum(0)
        starts = torch.searchsorted(owner[by_layer], owner[by_layer], side="left")
        before = torch.cat([torch.zeros(1, dtype=torch.int64), grouped])[starts]
        layer_total = torch.empty_like(costs)
        layer_total[by_layer] = base + grouped - before
        in_floor = layer_total <= floor
        allowed = layer_total <= cap
        n = self.dims.num_layers
        floor_params = base * len(layers) + int(costs[in_floor].sum())
        extra = allowed & ~in_floor
        room = math.floor(budget) - floor_params
        fits = torch.zeros_like(extra)
        fits[extra] = costs[extra].cumsum(0) <= room  # a prefix: stops at the first that no longer fits
        kept = in_floor | fits
        attn_keep = 1 + torch.bincount(owner[kept & ~is_mlp], minlength=n)
        mlp_keep = min_mlp + torch.bincount(owner[kept & is_mlp], minlength=n)
        out = []
        for layer in layers:
            q, kv = self._heads_for_units(int(attn_keep[layer]))
            out.append((q, kv, self._round_mlp(int(mlp_keep[layer]), r)))
        return out

    def compensation_mode(self, compensate: str | bool | None = None) -> str:
        """A compensation mode from a CLI/API value: None → the plan's default; True/False (older callers and
        checkpoints) → the plan's default mode (least squares if that is "none") / "none"."""
        if compensate is None:
            return self.config.compensate
        if compensate is True:
            return self.config.compensate if self.config.compensate != "none" else "lstsq"
        if compensate is False:
            return "none"
        if compensate not in COMPENSATE_MODES:
            raise ConfigError("compensation", [f"unknown mode {compensate!r}"],
                              fix=f"use one of: {', '.join(COMPENSATE_MODES)}")
        return compensate

    def params_for(self, shape: Shape, compensate: str | bool | None = None) -> int:
        return shape.num_params(self.dims, bias=self.compensation_mode(compensate) != "none")

    def width_for_params(self, depth: int, max_params: int, mode: str = "global", *,
                         compensate: str | bool | None = None) -> Shape | None:
        """The widest shape of ``depth`` layers within ``max_params`` (bisection on the width ratio)."""
        lo, hi = 0.05, 1.0
        if self.params_for(self.shape(depth, lo, mode), compensate) > max_params:
            return None
        if self.params_for(self.shape(depth, hi, mode), compensate) <= max_params:
            return self.shape(depth, hi, mode)
        for _ in range(14):
            mid = (lo + hi) / 2
            if self.params_for(self.shape(depth, mid, mode), compensate) <= max_params:
                lo = mid
            else:
                hi = mid
        return self.shape(depth, math.floor(lo * 1e4) / 1e4, mode)  # rounding up could break the budget

    def shapes_for_params(self, max_params: int, mode: str = "global", *,
                          compensate: str | bool | None = None) -> list[Shape]:
        """One candidate per plan depth: the widest shape of that depth within ``max_params``."""
        shapes = [self.width_for_params(d, max_params, mode, compensate=compensate) for d in self.depths]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            smallest = self.shape(min(self.depths), 0.05, mode)
            raise ShapeError(f"no shape has ≤ {max_params:,} parameters; the smallest, {smallest.name}, has "
                             f"{self.params_for(smallest, compensate):,}",
                             fix="raise --params or plan deeper removals (--max-removed)")
        return shapes

    # -- elastic model ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, elastic, *, compensate: str | bool | None = None, depth_maps: bool | None = None,
              depth_map_tokens: int | None = None) -> None:
        """Permute an ElasticLM (built from this plan's model, not yet permuted) by importance and attach the
        reconstruction: width compensation per layer and, when ``depth_maps``, depth maps fitted per shape on
        ``depth_map_tokens`` calibration tokens (None: the plan's)."""
        if getattr(elastic, "plan_applied", False):
            raise ShapeError("this elastic model already has a plan applied", fix="build a fresh one")
        if ModelDims.from_config(elastic.config) != self.dims:
            raise CheckpointError("the plan was computed for a different model",
                                  fix=f"use the plan's model {self.model_dir} or re-run amoeba plan")
        for layer, rk in enumerate(self.rankings):
            elastic.reorder_(layer, heads=rk.head_perm, mlp=rk.mlp_perm)
        mode = self.compensation_mode(compensate)
        elastic.set_compensation(self.compensators(mode), mode)
        use_maps = self.config.depth_maps if depth_maps is None else depth_maps
        elastic.set_depth_reconstruction(self.depth_reconstruction(depth_map_tokens) if use_maps else None)
        elastic.plan_applied = True

    def compensators(self, mode: str) -> list[dict[str, Compensator]] | None:
        """Per layer, the o_proj/down_proj compensators of ``mode`` (None for "none")."""
        mode = self.compensation_mode(mode)
        if mode == "mean":
            return [{"o_proj": MeanCompensation(r.attn_mean), "down_proj": MeanCompensation(r.mlp_mean)}
                    for r in self.rankings]
        if mode == "lstsq":
            ridge = self.config.width_ridge

            def reader(layer: int, kind: str) -> Callable[[], torch.Tensor]:  # gram.safetensors read on first use
                return lambda: getattr(self.covariances[layer], kind)

            return [{"o_proj": LeastSquaresCompensation(r.attn_mean, reader(i, "attn"), ridge),
                     "down_proj": LeastSquaresCompensation(r.mlp_mean, reader(i, "mlp"), ridge)}
                    for i, r in enumerate(self.rankings)]
        return None

    def depth_reconstruction(self, tokens: int | None = None) -> DepthReconstruction:
        """Depth maps fitted on the plan's calibration rows (attach with ``elastic.set_depth_reconstruction``)."""
        return DepthReconstruction(self.depth_map_rows(tokens), ridge=self.config.depth_ridge)

    def depth_map_rows(self, tokens: int | None = None) -> torch.Tensor:
        """``tokens`` of the calibration rows, spread over them: whole rows, from one row up to all the plan holds.
        The default is the plan's ``depth_map_tokens``, or every row when the plan holds fewer (a small plan); a
        number asked for explicitly beyond what it holds is an error, not a silent cap."""
        rows = self.calibration_rows
        if rows is None:
            raise CheckpointError("this plan holds no calibration rows for depth maps", fix="re-run amoeba plan")
        tokens = min(self.config.depth_map_tokens, rows.numel()) if tokens is None else tokens
        if not rows.shape[1] <= tokens <= rows.numel():
            raise ConfigError("depth-map tokens", [f"{tokens:,} asked; this plan holds {rows.numel():,} calibration "
                                                   f"tokens in rows of {rows.shape[1]}"],
                              fix=f"pass from {rows.shape[1]:,} to {rows.numel():,}")
        n = tokens // rows.shape[1]  # 1 ≤ n ≤ rows held, by the check above
        return rows[torch.linspace(0, rows.shape[0] - 1, n).round().long()]

    @cached_property
    def covariances(self) -> tuple[LayerCovariance, ...]:
        """Per-layer input covariances (read from gram.safetensors on first use)."""
        if self.layer_covariances is not None:
            return self.layer_covariances
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(self.path or "") / GRAM_FILE
        recorded = (read_meta(path.parent).get("files") or {}) if self.path else {}
        if GRAM_FILE in recorded:  # the 160 MB file is hashed here, when a shape first needs it, not on every load
            verify_files(path.parent, {GRAM_FILE: recorded[GRAM_FILE]})
        try:
            t = load_file(str(path))
            d = self.dims
            q_dim = d.num_heads * d.head_dim
            return tuple(LayerCovariance(attn=unpack_symmetric(t[f"layer.{i}.attn_cov"], q_dim),
                                         mlp=unpack_symmetric(t[f"layer.{i}.mlp_cov"], d.intermediate_size))
                         for i in range(d.num_layers))
        except (OSError, SafetensorError, KeyError) as exc:
            raise CheckpointError(f"cannot read the input covariances {path} ({exc})",
                                  fix="re-run amoeba plan, or extract with --compensate mean") from exc

    # -- persistence --------------------------------------------------------------------------------
    def save(self, out: str | Path, *, force: bool = False, extra_meta: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for i, rk in enumerate(self.rankings):
            for key, value in asdict(rk).items():
                tensors[f"layer.{i}.{key}"] = value.contiguous()
        if self.calibration_rows is not None:
            tensors["calibration.rows"] = self.calibration_rows.to(torch.int32).contiguous()
        gram = {}
        if self.layer_covariances is not None or self.path is not None:
            for i, cov in enumerate(self.covariances):
                gram[f"layer.{i}.attn_cov"] = pack_symmetric(cov.attn)
                gram[f"layer.{i}.mlp_cov"] = pack_symmetric(cov.mlp)
        body = {
            "version": PLAN_VERSION,
            "model_dir": self.model_dir,
            "dims": asdict(self.dims),
            "config": asdict(self.config),
            "depth_tables": {m: {str(k): list(v) for k, v in t.items()} for m, t in self.depth_tables.items()},
            "stats": self.stats,
        }
        with atomic_dir(out, force=force) as tmp:
            save_file(tensors, str(tmp / "width.safetensors"))
            if gram:
                save_file(gram, str(tmp / GRAM_FILE))
            write_json(tmp / "plan.json", body)
            # Hashed once, here: the plan's identity (what caches downstream key on) derives from these.
            files = file_inventory(tmp)
            write_meta(tmp, {"kind": "plan", "version": PLAN_VERSION, "model_dir": self.model_dir,
                             "files": files, "identity": content_identity("plan", files, model_dir=self.model_dir),
                             **(extra_meta or {})})
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_meta(path, kind="plan")
        # Files a plan records are checked before use: plan.json and width.safetensors by sha256 (small), the
        # covariances by size here and by sha256 when first read. Plans written before records skip this.
        files = meta.get("files")
        if files is not None:
            small = {k: v for k, v in files.items() if k != GRAM_FILE} if isinstance(files, dict) else files
            problems = file_problems(path, small) + file_problems(
                path, {k: v for k, v in files.items() if k == GRAM_FILE} if isinstance(files, dict) else {},
                checksums=False)
            if problems:
                raise CheckpointError(f"plan {path} is not what its meta.json records: " + "; ".join(problems),
                                      fix="re-run amoeba plan (with --force)")
        try:
            body = json.loads((path / "plan.json").read_text())
            tensors = load_file(str(path / "width.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"plan {path} is corrupt ({exc})", fix="re-run amoeba plan") from exc
        if not isinstance(body, dict) or body.get("version") != PLAN_VERSION:
            version = body.get("version") if isinstance(body, dict) else None
            raise CheckpointError(f"plan version {version} is not supported", fix="re-run amoeba plan")
        if problems := plan_problems(body, tensors):
            raise CheckpointError(f"plan {path} is corrupt: " + "; ".join(problems[:8])
                                  + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""),
                                  fix="re-run amoeba plan")
        try:
            dims = ModelDims(**body["dims"])
            if "qkv_bias" not in body["dims"]:  # written before the family flags: the model's config says them
                dims = replace(dims, **_family_flags(Path(body["model_dir"])))
            fields = LayerRanking.__dataclass_fields__
            rankings = tuple(LayerRanking(**{k: tensors[f"layer.{i}.{k}"] for k in fields})
                             for i in range(dims.num_layers))
            tables = {m: {int(k): tuple(v) for k, v in t.items()} for m, t in body["depth_tables"].items()}
            rows = tensors.get("calibration.rows")
            return cls(model_dir=body["model_dir"], dims=dims, config=PlanConfig.from_dict(body["config"]),
                       depth_tables=tables, rankings=rankings, stats=body.get("stats", {}), path=str(path),
                       calibration_rows=None if rows is None else rows.long())
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"plan {path} is incomplete (missing {exc})", fix="re-run amoeba plan") from exc


# No real model has a dimension beyond this; a larger one in plan.json is damage (and would be allocated).
MAX_DIM = 1 << 24


def _is_permutation(t: torch.Tensor, n: int) -> bool:
    return t.dim() == 1 and t.numel() == n and not t.is_floating_point() and bool(
        torch.equal(torch.sort(t.long()).values, torch.arange(n)))


def plan_problems(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every inconsistency of a plan read from disk, found before any of it is used: a plan whose permutation was
    cut short would otherwise extract a subnet whose config and weights disagree (and exit 0)."""
    out: list[str] = []
    dims = body.get("dims")
    flags = ("tied_embeddings", "qkv_bias", "qk_norm")
    fields = [f for f in ModelDims.__dataclass_fields__ if f not in flags]
    if not isinstance(dims, dict) or any(not isinstance(dims.get(f), int) or isinstance(dims.get(f), bool)
                                         or not 1 <= dims[f] <= MAX_DIM for f in fields):
        return [f"dims must hold integers in 1..{MAX_DIM}: {', '.join(fields)}, got {dims!r}"]
    if unknown := set(dims) - set(ModelDims.__dataclass_fields__):
        return [f"dims has unknown keys {sorted(unknown)}"]
    if bad := [f for f in flags if f in dims and not isinstance(dims[f], bool)]:
        return [f"dims.{', dims.'.join(bad)} must be true or false"]
    if dims["num_heads"] % dims["num_kv_heads"]:
        out.append("dims.num_heads is not a multiple of dims.num_kv_heads")
    config = body.get("config")
    if not isinstance(config, dict):
        out.append("config is not a mapping")
    else:
        try:
            out += [f"config: {p}" for p in PlanConfig.from_dict(config).problems()]
        except (TypeError, ValueError, CheckpointError) as exc:
            out.append(f"config: {exc}")
    n = dims["num_layers"]
    tables = body.get("depth_tables")
    if not isinstance(tables, dict) or not tables:
        out.append("depth_tables is not a non-empty mapping")
    else:
        for method, table in tables.items():
            if not isinstance(table, dict):
                out.append(f"depth_tables.{method} is not a mapping")
                continue
            for depth, layers in table.items():
                ok = (str(depth).isdigit() and isinstance(layers, list)
                      and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in layers)
                      and len(set(layers)) == len(layers) == int(depth))
                if not ok:
                    out.append(f"depth_tables.{method}[{depth!r}] is not {depth} distinct layer indices in 0..{n - 1}")
    units = dims["num_heads"] // dims["num_kv_heads"]
    units = units if units > 1 else dims["num_heads"]
    sizes = {"head_perm": dims["num_heads"], "mlp_perm": dims["intermediate_size"], "attn_scores": units,
             "mlp_scores": dims["intermediate_size"], "attn_mean": dims["num_heads"] * dims["head_dim"],
             "mlp_mean": dims["intermediate_size"]}
    for i in range(n):
        if len(out) > 20:  # enough to act on; a plan of another model would list every layer
            break
        for key, size in sizes.items():
            t = tensors.get(f"layer.{i}.{key}")
            if t is None:
                out.append(f"layer {i} has no {key}")
            elif key.endswith("_perm") and not _is_permutation(t, size):
                out.append(f"layer {i}: {key} is not a permutation of {size} entries ({t.numel()} given)")
            elif t.dim() != 1 or t.numel() != size:
                out.append(f"layer {i}: {key} has {t.numel()} entries, expected {size}")
    return out


def _family_flags(model_dir: Path) -> dict[str, bool]:
    """ModelDims' family flags from a model folder's config.json (none when it cannot be read)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    return {"qkv_bias": kind == "qwen2", "qk_norm": kind == "qwen3"}


def load_elastic(plan_dir: str | Path, *, compensate: str | bool | None = None, plan: Plan | None = None,
                 depth_maps: bool | None = None, depth_map_tokens: int | None = None):
    """The plan's model, made elastic and permuted by the plan: ``(ElasticLM, Plan)``.

    ``plan``: the already-loaded plan of ``plan_dir``, to skip reading it again. ``compensate`` and
    ``depth_maps`` default to the plan's config; training passes ``depth_maps=False`` (maps are cached per
    shape and would go stale as the weights change)."""
    from ..elastic import make_elastic
    from ..modelio import load_model

    plan = plan or Plan.load(plan_dir)
    elastic = make_elastic(load_model(plan.model_dir))
    plan.apply(elastic, compensate=compensate, depth_maps=depth_maps, depth_map_tokens=depth_map_tokens)
    return elastic, plan


def max_removed_layers(num_layers: int, fraction: float) -> int:
    return int(math.floor(num_layers * fraction + 1e-9))
