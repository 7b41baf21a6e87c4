"""An exportable decoder with a static KV cache, for stock Llama-family models and per-layer widths alike.

``forward(tokens [1, T], input_pos [1]) -> logits`` is the signature ExecuTorch's LLM runner calls
(``input_pos`` holds the position of ``tokens[0, 0]``), so one program does prefill (any T up to the cache
length) and decode (T = 1). The HF model's own linears, norms and MLPs are reused, so torchao's ``quantize_``
sees ordinary ``nn.Linear`` modules and biases or rope scaling come for free; only attention and the cache are
written here, with head counts read from each layer's weights (which is what makes per-layer widths work
without a second code path).

Two attention implementations (:data:`ATTENTION`), picked per export:

- ``custom`` (default): ExecuTorch's own LLM ops, ``llama::update_cache`` writes the new keys/values in place
  and ``llama::custom_sdpa`` attends causally from ``start_pos`` — it reads only the filled positions
  ``[0, start_pos + T)`` and handles grouped-query attention itself (no repeated or folded cache). These are
  the ops ExecuTorch's ``export_llm`` emits; their kernels ship in the executorch wheel
  (``libcustom_ops_aot_lib.so``), which :func:`load_custom_ops` loads for export and for the runtime.
- ``masked`` (the previous module, kept as the benchmark's baseline): ``index_copy_`` into the cache and a
  matmul over all ``max_context`` keys with an additive mask, so every decode step costs the whole cache.

``full_logits=False`` (the default, as ExecuTorch's ``generate_full_logits=False``) returns the last token's
logits ``[1, vocab]`` only: prefill skips ``T - 1`` rows of the largest matmul in the model. :class:`FullLogits`
wraps the same module (same weights) to return every row; the backend can export it as a second method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from amoeba_export.errors import BackendError, RuntimeMissingError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Int8Embedding(nn.Module):
    """Symmetric per-row int8 embedding table; runs on ExecuTorch's portable kernels (gather + multiply)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.qweight).float() * nn.functional.embedding(ids, self.scale)


class _Attention(nn.Module):
    """What both attentions keep of an HF attention module: projections, head counts, scaling, q/k norms, and a
    static cache in the subclass's layout (``token_major``)."""

    token_major = False  # cache [1, max_context, kv_heads, head_dim] when True, else [1, kv_heads, max_context, ...]

    def __init__(self, attn: nn.Module, head_dim: int, max_context: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = head_dim
        self.q_heads = attn.q_proj.out_features // head_dim
        self.kv_heads = attn.k_proj.out_features // head_dim
        self.scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        # Qwen3 (and its subnets): per-head RMSNorm on queries and keys before RoPE; None elsewhere.
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        shape = ((1, max_context, self.kv_heads, head_dim) if self.token_major
                 else (1, self.kv_heads, max_context, head_dim))
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)


class CachedAttention(_Attention):
    """The ``masked`` baseline: grouped-query attention over all of a ``[1, kv_heads, max_context, head_dim]`` cache."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        t, d, kv = x.shape[1], self.head_dim, self.kv_heads
        group = self.q_heads // kv
        q = self.q_proj(x).view(1, t, self.q_heads, d)
        k = self.k_proj(x).view(1, t, kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(1, t, kv, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        # Query head h reads KV head h // group (HF's repeat_kv): fold each group's queries into rows of
        # one KV head instead of repeating the cache.
        q = q.reshape(1, kv, group * t, d)
        # mask is additive (0 / -inf): an add stays inside the XNNPACK partition, masked_fill would split it.
        scores = torch.matmul(q, self.k_cache.transpose(2, 3)) * self.scaling + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)
        out = out.reshape(1, self.q_heads, t, d).transpose(1, 2).reshape(1, t, self.q_heads * d)
        return self.o_proj(out)


class CustomOpAttention(_Attention):
    """The ``custom`` attention: ExecuTorch's ``update_cache`` + ``custom_sdpa`` over a ``[1, max_context, kv_heads,
    head_dim]`` cache, reading only the positions filled so far."""

    # Token-major ([batch, position, head, dim]) is the layout both ops take: the projections' output needs a
    # view, never a transpose.
    token_major = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        t, d = x.shape[1], self.head_dim
        q = self.q_proj(x).view(1, t, self.q_heads, d)
        k = self.k_proj(x).view(1, t, self.kv_heads, d)
        v = self.v_proj(x).view(1, t, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        # is_causal with start_pos: query i sees keys [0, start + i]; nothing past the filled part is read.
        out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, self.scaling)
        return self.o_proj(out.reshape(1, t, self.q_heads * d))


@dataclass(frozen=True)
class AttentionKind:
    """One way to attend over the static cache; :class:`StaticCacheLM` takes any entry of :data:`ATTENTION`."""

    name: str
    attention: Callable[..., nn.Module]  # (hf attention module, head_dim, max_context) -> module
    custom_ops: bool  # the program calls ExecuTorch's llama:: ops (their library must be loaded)
    description: str


ATTENTION: dict[str, AttentionKind] = {k.name: k for k in (
    AttentionKind("custom", CustomOpAttention, True,
                  "ExecuTorch's update_cache + custom_sdpa: attends to the filled positions only"),
    AttentionKind("masked", CachedAttention, False,
                  "index_copy_ + masked matmul over the whole cache (the previous module; a baseline)"),
)}
DEFAULT_ATTENTION = "custom"


def attention_kind(name: str) -> AttentionKind:
    kind = ATTENTION.get(name)
    if kind is None:
        raise BackendError(f"unknown ExecuTorch attention {name!r}; supported are: {', '.join(ATTENTION)}",
                           fix=f"pass attention={DEFAULT_ATTENTION!r}")
    return kind


@cache
def load_custom_ops(*, for_export: bool = False) -> None:
    """Register ExecuTorch's ``llama::`` ops: their kernels in ExecuTorch's runtime, and for export their
    PyTorch implementations and shape functions.

    The runtime needs only the shared library (loaded after ``portable_lib``, whose kernel registry it fills);
    export imports ExecuTorch's ``custom_ops`` module, which loads the same library and adds the Meta kernels
    that tracing needs. Idempotent: the module skips the library when the ops already exist.
    """
    try:
        from executorch.extension.pybindings import portable_lib  # noqa: F401  (the library registers into it)

        if for_export:
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
            return
        if not hasattr(torch.ops.llama, "custom_sdpa"):
            import executorch.extension.llm.custom_ops as pkg

            libs = sorted(Path(pkg.__file__).parent.glob("**/*custom_ops_aot_lib.*"))
            if not libs:
                raise OSError(f"no custom_ops_aot_lib in {Path(pkg.__file__).parent}")
            torch.ops.load_library(str(libs[0]))
    except (ImportError, OSError, AssertionError, RuntimeError) as exc:
        raise RuntimeMissingError(f"ExecuTorch's LLM custom ops (llama::custom_sdpa, llama::update_cache) do not "
                                  f"load: {type(exc).__name__}: {exc}",
                                  fix="pip install --force-reinstall executorch, or export with "
                                      "attention='masked'") from exc


class CachedLayer(nn.Module):
    def __init__(self, layer: nn.Module, head_dim: int, max_context: int, kind: AttentionKind) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = kind.attention(layer.self_attn, head_dim, max_context)
        self.mlp = layer.mlp
        self.group = self.self_attn.q_heads // self.self_attn.kv_heads

    def forward(self, h, cos, sin, *where):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, *where)
        return h + self.mlp(self.post_attention_layernorm(h))


class StaticCacheLM(nn.Module):
    """A causal LM with its KV cache inside the program (the cache persists between calls).

    ``attention`` names an :data:`ATTENTION` entry; ``full_logits`` makes ``forward`` return ``[1, T, vocab]``
    (every token's logits) instead of the last token's ``[1, vocab]``. Both variants of one model share every
    weight and cache buffer, so :class:`FullLogits` wraps one for the validation method without copying.
    """

    def __init__(self, hf_model: nn.Module, max_context: int, *, attention: str = DEFAULT_ATTENTION,
                 full_logits: bool = False) -> None:
        super().__init__()
        config = hf_model.config
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_context:
            raise BackendError(f"the model attends to a sliding window of {window} tokens, shorter than the "
                               f"cache of {max_context}", fix=f"export with max_context <= {window}")
        self.kind = attention_kind(attention)
        if self.kind.custom_ops:
            load_custom_ops(for_export=True)
        body = hf_model.model
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.max_context = max_context
        self.full_logits = full_logits
        self.embed_tokens = body.embed_tokens
        self.layers = nn.ModuleList(CachedLayer(layer, head_dim, max_context, self.kind) for layer in body.layers)
        self.norm = body.norm
        self.lm_head = hf_model.lm_head
        # HF's rotary module gives cos/sin for every position once (rope scaling and attention_scaling included).
        with torch.no_grad():
            positions = torch.arange(max_context)[None]
            probe = torch.zeros(1, 1, head_dim)
            cos, sin = body.rotary_emb(probe, positions)
        self.register_buffer("rope_cos", cos[0].float().contiguous(), persistent=False)
        self.register_buffer("rope_sin", sin[0].float().contiguous(), persistent=False)
        self.register_buffer("key_positions", torch.arange(max_context), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.logits(tokens, input_pos, self.full_logits)

    def logits(self, tokens: torch.Tensor, input_pos: torch.Tensor, full: bool) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed_tokens(tokens)
        h = (self._custom_layers if self.kind.custom_ops else self._masked_layers)(h, input_pos, t)
        if not full:
            h = h[:, -1, :]  # only the next token's logits: the lm_head runs on one row
        return self.lm_head(self.norm(h))

    def _custom_layers(self, h: torch.Tensor, input_pos: torch.Tensor, t: int) -> torch.Tensor:
        # A Python int traced as a bounded symbol (as ExecuTorch's own llama export does): the ops take it as
        # start_pos, and narrow reads the rope rows without a gather.
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start < self.max_context)
        cos = self.rope_cos.narrow(0, start, t).unsqueeze(1)  # [T, 1, head_dim]: broadcast over heads
        sin = self.rope_sin.narrow(0, start, t).unsqueeze(1)
        for layer in self.layers:
            h = layer(h, cos, sin, start)
        return h

    def _masked_layers(self, h: torch.Tensor, input_pos: torch.Tensor, t: int) -> torch.Tensor:
        pos = input_pos[:1] + torch.arange(t, dtype=torch.long)
        cos = self.rope_cos.index_select(0, pos)
        sin = self.rope_sin.index_select(0, pos)
        masks: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            # Rows are (group, token) pairs; a key is visible when its position <= the row's token position.
            mask = masks.get(layer.group)
            if mask is None:
                rows = pos.repeat(layer.group)
                hidden = self.key_positions[None, :] > rows[:, None]
                mask = masks[layer.group] = torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))
            h = layer(h, cos, sin, pos, mask)
        return h

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()


class FullLogits(nn.Module):
    """``lm``'s forward with every token's logits ``[1, T, vocab]`` (the validation method of the program)."""

    def __init__(self, lm: StaticCacheLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(tokens, input_pos, True)
