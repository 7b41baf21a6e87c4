"""Config of a Llama-family subnet whose layers have different widths.

Self-contained (imports only transformers): extraction copies this file next to the weights so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without amoeba-export.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


@strict
class AmoebaLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer head counts and MLP widths, and the optional biases a pruned model needs.

    ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` hold the widest layer's
    sizes (for tools that read one number); the ``layer_*`` lists are authoritative.
    """

    model_type = "amoeba_llama"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    qkv_bias: bool = False
    o_proj_bias: bool = False
    down_proj_bias: bool = False
    # Per-head RMSNorm on queries and keys before RoPE (subnets of Qwen3); weights self_attn.q_norm/k_norm.
    qk_norm: bool = False

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            kv = self.num_key_value_heads or self.num_attention_heads
            self.layer_num_key_value_heads = [kv] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        # head_dim is explicit, so the hidden size need not divide by the head count.
        n = self.num_hidden_layers
        for name in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} layers")
        if self.layer_num_attention_heads and self.layer_num_key_value_heads:
            for i, (q, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
                if kv < 1 or q % kv:
                    raise ValueError(f"layer {i}: {q} query heads do not divide into {kv} KV heads")

    def layer_config(self, index: int) -> "AmoebaLlamaConfig":
        """A one-layer config describing layer ``index`` alone (biases are added by the model).

        Built as this class, not LlamaConfig, because LlamaConfig insists that the head count divides the
        hidden size, which a pruned layer (explicit head_dim) need not satisfy.
        """
        return AmoebaLlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.layer_intermediate_sizes[index],
            num_attention_heads=self.layer_num_attention_heads[index],
            num_key_value_heads=self.layer_num_key_value_heads[index],
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            attention_dropout=self.attention_dropout,
            attention_bias=False,
            mlp_bias=False,
            vocab_size=self.vocab_size,
            num_hidden_layers=1,
        )


__all__ = ["AmoebaLlamaConfig"]
