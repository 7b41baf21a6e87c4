"""An exportable decoder with a static KV cache, for stock Llama-family models and per-layer widths alike.

``forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]`` is the signature ExecuTorch's LLM runner
calls (``input_pos`` holds the position of ``tokens[0, 0]``), so one program does prefill (any T up to the
cache length) and decode (T = 1). The HF model's own linears, norms and MLPs are reused, so torchao's
``quantize_`` sees ordinary ``nn.Linear`` modules and biases or rope scaling come for free; only attention
and the cache are written here, with head counts read from each layer's weights (which is what makes
per-layer widths work without a second code path).
"""

from __future__ import annotations

import torch
from torch import nn

from amoeba_export.errors import BackendError


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


class CachedAttention(nn.Module):
    """Grouped-query attention over a static ``[1, kv_heads, max_context, head_dim]`` cache."""

    def __init__(self, attn: nn.Module, head_dim: int, max_context: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = head_dim
        self.q_heads = attn.q_proj.out_features // head_dim
        self.kv_heads = attn.k_proj.out_features // head_dim
        self.scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        # Qwen3 (and its subnets): per-head RMSNorm on queries and keys before RoPE; None elsewhere.
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        shape = (1, self.kv_heads, max_context, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

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


class CachedLayer(nn.Module):
    def __init__(self, layer: nn.Module, head_dim: int, max_context: int) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = CachedAttention(layer.self_attn, head_dim, max_context)
        self.mlp = layer.mlp
        self.group = self.self_attn.q_heads // self.self_attn.kv_heads

    def forward(self, h, cos, sin, pos, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class StaticCacheLM(nn.Module):
    """A causal LM with its KV cache inside the program (the cache persists between calls)."""

    def __init__(self, hf_model: nn.Module, max_context: int) -> None:
        super().__init__()
        config = hf_model.config
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_context:
            raise BackendError(f"the model attends to a sliding window of {window} tokens, shorter than the "
                               f"cache of {max_context}", fix=f"export with max_context <= {window}")
        body = hf_model.model
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.max_context = max_context
        self.embed_tokens = body.embed_tokens
        self.layers = nn.ModuleList(CachedLayer(layer, head_dim, max_context) for layer in body.layers)
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
        t = tokens.shape[1]
        pos = input_pos[:1] + torch.arange(t, dtype=torch.long)
        cos = self.rope_cos.index_select(0, pos)
        sin = self.rope_sin.index_select(0, pos)
        h = self.embed_tokens(tokens)
        masks: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            # Rows are (group, token) pairs; a key is visible when its position <= the row's token position.
            mask = masks.get(layer.group)
            if mask is None:
                rows = pos.repeat(layer.group)
                hidden = self.key_positions[None, :] > rows[:, None]
                mask = masks[layer.group] = torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))
            h = layer(h, cos, sin, pos, mask)
        return self.lm_head(self.norm(h))

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()
