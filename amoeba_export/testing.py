"""Tiny random Llama-family checkpoints built in-process, for tests (deterministic, offline, fast)."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "the cat sat on the mat. an elastic model has any depth and any width. we export small subnets "
    "to onnx, gguf and executorch, then validate and benchmark every artifact. hello tiny world! "
) * 40


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (fast, GPT-2 style) trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token=None)


def tiny_llama_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, vocab: int = 320, tie: bool = False, arch: str = "llama",
                      head_dim: int | None = None):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.15, bos_token_id=0,
                  eos_token_id=0)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if arch == "llama":
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return cls(**kwargs)


def tiny_llama(out: str | Path | None = None, *, seed: int = 0, **config_kwargs):
    """A random causal LM (fp32, eval); saved with a tokenizer to ``out`` when given."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return _finish(model, out)


def tiny_amoeba_llama(out: str | Path | None = None, *, q_heads=(2, 4, 4), kv_heads=(2, 2, 1), mlp=(128, 32, 96),
                      hidden: int = 64, head_dim: int = 16, vocab: int = 320, tie: bool = False,
                      qkv_bias: bool = False, o_proj_bias: bool = False, down_proj_bias: bool = False,
                      seed: int = 0):
    """A random per-layer-width ``amoeba_llama`` model, as extraction writes them (saved when ``out``)."""
    import torch

    from .hf import AmoebaLlamaConfig, AmoebaLlamaForCausalLM

    torch.manual_seed(seed)
    config = AmoebaLlamaConfig(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim, num_hidden_layers=len(q_heads),
        num_attention_heads=max(q_heads), num_key_value_heads=max(kv_heads), intermediate_size=max(mlp),
        layer_num_attention_heads=list(q_heads), layer_num_key_value_heads=list(kv_heads),
        layer_intermediate_sizes=list(mlp), qkv_bias=qkv_bias, o_proj_bias=o_proj_bias,
        down_proj_bias=down_proj_bias, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _finish(AmoebaLlamaForCausalLM(config).eval(), out)


def _finish(model, out: str | Path | None):
    import torch

    # Non-trivial norms and biases, so permutation/slicing bugs cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if out is not None:
        out = Path(out)
        model.save_pretrained(out, safe_serialization=True)
        tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
    return model
