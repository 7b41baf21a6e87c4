"""A Llama-family causal LM whose decoder layers have their own head counts and MLP widths.

Self-contained (imports only transformers and the config beside it): extraction copies this file into
the subnet folder, so the folder loads with ``trust_remote_code=True`` without amoeba-export installed.
Each layer is a stock ``LlamaDecoderLayer`` built from a per-layer config, so attention kernels, caches
and generation are transformers' own.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from .configuration_amoeba_llama import AmoebaLlamaConfig


def _with_bias(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=True,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        out.bias.zero_()
    return out


class AmoebaLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: AmoebaLlamaConfig, layer_idx: int):
        layer_config = config.layer_config(layer_idx)
        layer_config._attn_implementation = config._attn_implementation
        super().__init__(layer_config, layer_idx)
        if config.qk_norm:
            # Qwen3's attention is Llama's plus q_norm/k_norm (same projections, RoPE and kernels), so a Qwen3
            # subnet keeps transformers' own forward and its checkpoint's tensor names.
            self.self_attn = Qwen3Attention(layer_config, layer_idx)
        attn, mlp = self.self_attn, self.mlp
        if config.qkv_bias:
            attn.q_proj, attn.k_proj, attn.v_proj = (_with_bias(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        if config.o_proj_bias:
            attn.o_proj = _with_bias(attn.o_proj)
        if config.down_proj_bias:
            mlp.down_proj = _with_bias(mlp.down_proj)
        # The attention kernel dispatch must follow the *model's* setting, not the per-layer copy's.
        attn.config = config


class AmoebaLlamaModel(LlamaModel):
    config_class = AmoebaLlamaConfig

    def __init__(self, config: AmoebaLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [AmoebaLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()


class AmoebaLlamaForCausalLM(LlamaForCausalLM):
    config_class = AmoebaLlamaConfig

    def __init__(self, config: AmoebaLlamaConfig):
        super().__init__(config)
        self.model = AmoebaLlamaModel(config)
        self.post_init()


__all__ = ["AmoebaLlamaForCausalLM", "AmoebaLlamaModel"]
