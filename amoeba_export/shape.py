"""A subnet's shape: which layers are kept and how wide each kept layer is.

Widths are stored as real sizes (query heads, KV heads, MLP channels per kept layer), so a shape is
meaningful on its own and maps one-to-one onto the extracted checkpoint's config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ShapeError

SHAPE_VERSION = 1

# What a parameter budget counts. "total" (the default) is every parameter, embeddings included: what a model
# card states and what file size and memory follow. "transformer" leaves out the embedding and lm_head, which
# no shape changes: what compute per token follows, and what a user of a large-vocabulary model means by "half
# the model" (Qwen2-0.5B's untied embeddings are 272M of its 630M parameters, so half the total keeps ~1/8 of
# its transformer).
PARAMS_KINDS = ("total", "transformer")


@dataclass(frozen=True)
class ModelDims:
    """The full model's dimensions that shapes are checked against."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    # Per-layer weights some families add (so budgets and sizes count them): Qwen2's q/k/v biases, Qwen3's
    # per-head q/k RMSNorm weights. Defaults keep plans written before these fields loadable.
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def embedding_params(self) -> int:
        """The embedding table plus an untied lm_head: the same in every shape."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def total_budget(self, params: int, kind: str) -> int:
        """A ``kind`` budget (see PARAMS_KINDS) as a total-parameter budget: equivalent, since every shape has
        the same embedding parameters."""
        if kind not in PARAMS_KINDS:
            raise ShapeError(f"unknown parameter kind {kind!r}; supported are: {', '.join(PARAMS_KINDS)}",
                             fix="pass --params-kind total or transformer")
        return params + (self.embedding_params if kind == "transformer" else 0)

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=getattr(config, "model_type", "") == "qwen2" or bool(getattr(config, "qkv_bias", False)),
            qk_norm=getattr(config, "model_type", "") == "qwen3" or bool(getattr(config, "qk_norm", False)),
        )


@dataclass(frozen=True)
class Shape:
    """``layers``: kept layer indices of the full model (ascending); per kept layer its width."""

    layers: tuple[int, ...]
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp: tuple[int, ...]
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    version: int = SHAPE_VERSION

    @classmethod
    def full(cls, dims: ModelDims, name: str = "full") -> Shape:
        n = dims.num_layers
        return cls(tuple(range(n)), (dims.num_heads,) * n, (dims.num_kv_heads,) * n,
                   (dims.intermediate_size,) * n, name=name)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def uniform(self) -> bool:
        return len(set(self.q_heads)) <= 1 and len(set(self.kv_heads)) <= 1 and len(set(self.mlp)) <= 1

    def width_of(self, layer: int) -> tuple[int, int, int]:
        """(q_heads, kv_heads, mlp) of original layer ``layer``; raises if the layer is dropped."""
        i = self.layers.index(layer)
        return self.q_heads[i], self.kv_heads[i], self.mlp[i]

    def problems(self, dims: ModelDims) -> list[str]:
        """Every reason this shape is invalid for ``dims`` (empty when valid)."""
        out: list[str] = []
        n = len(self.layers)
        if n == 0:
            out.append("a shape must keep at least one layer")
        if list(self.layers) != sorted(set(self.layers)):
            out.append("layers must be strictly ascending")
        if any(i < 0 or i >= dims.num_layers for i in self.layers):
            out.append(f"layer indices must be in [0, {dims.num_layers})")
        lengths_ok = True
        for name, seq in (("q_heads", self.q_heads), ("kv_heads", self.kv_heads), ("mlp", self.mlp)):
            if len(seq) != n:
                out.append(f"{name} has {len(seq)} entries for {n} kept layers")
                lengths_ok = False
        if not lengths_ok:
            return out
        for layer, q, kv, m in zip(self.layers, self.q_heads, self.kv_heads, self.mlp):
            where = f"layer {layer}"
            if not 1 <= kv <= dims.num_kv_heads:
                out.append(f"{where}: kv_heads {kv} not in [1, {dims.num_kv_heads}]")
            elif q % kv:
                out.append(f"{where}: q_heads {q} is not a multiple of kv_heads {kv} (invalid GQA)")
            elif not kv <= q <= kv * dims.group_size:
                out.append(f"{where}: q_heads {q} not in [{kv}, {kv * dims.group_size}]")
            if dims.group_size > 1 and kv != dims.num_kv_heads:
                out.append(f"{where}: with grouped-query attention every KV head is kept "
                           f"(kv_heads must be {dims.num_kv_heads})")
            if not 1 <= m <= dims.intermediate_size:
                out.append(f"{where}: mlp {m} not in [1, {dims.intermediate_size}]")
        return out

    def validate(self, dims: ModelDims) -> Shape:
        problems = self.problems(dims)
        if problems:
            raise ShapeError(f"invalid shape {self.name or ''}: " + "; ".join(problems),
                             fix="pick a depth/width the plan offers")
        return self

    def num_params(self, dims: ModelDims, *, bias: bool = False) -> int:
        """Parameters of the extracted model (embeddings and lm_head counted once when tied)."""
        h, hd = dims.hidden_size, dims.head_dim
        total = dims.vocab_size * h * (1 if dims.tied_embeddings else 2) + h  # embed (+head) + final norm
        for q, kv, m in zip(self.q_heads, self.kv_heads, self.mlp):
            total += 2 * h  # two RMSNorms
            total += h * hd * (2 * q + 2 * kv) + 3 * h * m
            total += hd * (q + 2 * kv) if dims.qkv_bias else 0  # Qwen2's q/k/v biases
            total += 2 * hd if dims.qk_norm else 0  # Qwen3's q/k norms, one head_dim vector each
            if bias:
                total += 2 * h
        return total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("layers", "q_heads", "kv_heads", "mlp"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shape:
        version = d.get("version", SHAPE_VERSION)
        if version != SHAPE_VERSION:
            raise ShapeError(f"shape version {version} is not supported (this is {SHAPE_VERSION})",
                             fix="re-create the shape with this amoeba-export version")
        missing = [k for k in ("layers", "q_heads", "kv_heads", "mlp") if k not in d]
        if missing:
            raise ShapeError(f"shape is missing {', '.join(missing)}", fix="pass a shape written by amoeba")
        return cls(tuple(d["layers"]), tuple(d["q_heads"]), tuple(d["kv_heads"]), tuple(d["mlp"]),
                   name=d.get("name", ""), meta=dict(d.get("meta", {})), version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Shape:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        if self.uniform:
            return f"{self.depth}L × q{self.q_heads[0]}/kv{self.kv_heads[0]} × mlp{self.mlp[0]}"
        return (f"{self.depth}L × q{min(self.q_heads)}-{max(self.q_heads)} × "
                f"mlp{min(self.mlp)}-{max(self.mlp)} (per-layer)")
