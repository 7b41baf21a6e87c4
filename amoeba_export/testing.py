"""Tiny random Llama-family checkpoints built in-process, for tests (deterministic, offline, fast)."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "the cat sat on the mat. an elastic model has any depth and any width. we export small subnets "
    "to onnx, gguf and executorch, then validate and benchmark every artifact. hello tiny world! "
) * 40


# The split regexes of real tokenizers (their tokenizer.json), so tiny tokenizers pre-tokenize as they do.
SPLIT_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+",
}


def tiny_tokenizer(vocab_size: int = 320, style: str = "gpt2"):
    """A byte-level BPE tokenizer (fast) trained on a fixed text. ``style``: ``gpt2`` (plain byte-level),
    ``qwen2`` (Qwen2/Qwen3's split regex and NFC) or ``llama3`` (Llama 3's split regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[style]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=style == "llama3", use_regex=False)])
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token=None)


# More text for the SentencePiece tokenizer: capitals, digits, punctuation, tabs and a few non-ASCII letters, so
# its pieces cover more than TEXT's lower case (anything else falls back to bytes, as in Llama 2 and Mistral).
SPM_TEXT = (
    "The Canterbury corpus holds English text, source code and data. Elastic subnets keep any depth and width: "
    "GGUF files for llama.cpp, ONNX graphs and ExecuTorch programs.\n"
    "In 2024, 12 models ran 3.14 times faster! Is that true? Yes -- it is; see Table 7 (page 42).\n"
    "\tdef f(x):\n\t\treturn x * 2  # twice\n"
    "Caf\u00e9, na\u00efve, \u00fcber, \u00e9l\u00e8ve \u2014 \u201cquoted\u201d words and SentencePiece pieces.\n"
) * 8
SPM_VOCAB = 448


def tiny_sentencepiece_model(vocab_size: int = SPM_VOCAB) -> bytes:
    """A SentencePiece BPE model with byte fallback, trained on TEXT and SPM_TEXT with Llama 2 / Mistral's
    settings: ids 0-2 are <unk>, <s>, </s>, digits split, identity normalization, a dummy space prefix and no
    removal of extra whitespace. Returns the ``tokenizer.model`` bytes."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    lines = (TEXT + SPM_TEXT).replace(". ", ".\n").splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return out.getvalue()


def tiny_sentencepiece_tokenizer(vocab_size: int = SPM_VOCAB, **kwargs):
    """transformers' LlamaTokenizer converted from :func:`tiny_sentencepiece_model`, adding BOS as Llama 2 and
    Mistral do (``kwargs`` go to ``from_pretrained``); returns (tokenizer, model bytes)."""
    import tempfile

    from transformers import LlamaTokenizer

    raw = tiny_sentencepiece_model(vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(raw)
        tok = LlamaTokenizer.from_pretrained(tmp, **{"add_bos_token": True, "add_eos_token": False, **kwargs})
    return tok, raw


# Llama 3.x RoPE scaling at tiny size: original context 64 of 512, so the scaled (low) frequencies are used.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# One tiny stock model per family the pipeline supports (architectures.py), tied and untied embeddings both
# covered; tests and bench/any_model.py iterate over this table.
FAMILIES: dict[str, dict] = {
    "llama3": dict(arch="llama", rope=LLAMA3_ROPE, tie=False, tokenizer="llama3"),
    "llama-tied": dict(arch="llama", tie=True),
    "mistral": dict(arch="mistral", tie=False),
    "qwen2": dict(arch="qwen2", tie=False, tokenizer="qwen2"),
    "qwen3": dict(arch="qwen3", tie=True, tokenizer="qwen2"),
}
# Families with a SentencePiece-style tokenizer (tokenizer.model + a byte-fallback BPE tokenizer.json, ids 0-2
# <unk> <s> </s>), as Llama 2 and Mistral ship; kept apart from FAMILIES so bench/any_model.py runs as before.
SPM_FAMILIES: dict[str, dict] = {
    "llama2": dict(arch="llama", tie=False, tokenizer="spm", vocab=SPM_VOCAB, bos_token_id=1, eos_token_id=2),
    "mistral-spm": dict(arch="mistral", tie=False, tokenizer="spm", vocab=SPM_VOCAB, bos_token_id=1,
                        eos_token_id=2),
}


def tiny_llama_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, vocab: int = 320, tie: bool = False, arch: str = "llama",
                      head_dim: int | None = None, rope: dict | None = None, bos_token_id: int = 0,
                      eos_token_id: int = 0):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.15, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if arch == "qwen3" and head_dim is None:
        kwargs["head_dim"] = hidden // heads  # Qwen3Config's default is 128
    if rope is not None:
        kwargs["rope_parameters"] = dict(rope)
    elif arch == "llama":
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return cls(**kwargs)


def tiny_family(family: str, out: str | Path | None = None, *, seed: int = 0, **overrides):
    """A tiny random stock model of ``family`` (a key of :data:`FAMILIES` or :data:`SPM_FAMILIES`), saved to
    ``out`` when given."""
    return tiny_llama(out, seed=seed, **{**{**FAMILIES, **SPM_FAMILIES}[family], **overrides})


def tiny_llama(out: str | Path | None = None, *, seed: int = 0, tokenizer: str = "gpt2", **config_kwargs):
    """A random causal LM (fp32, eval); saved with a ``tokenizer``-style tokenizer to ``out`` when given
    (:func:`tiny_tokenizer`'s styles, or ``spm``: :func:`tiny_sentencepiece_tokenizer` and its tokenizer.model)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return _finish(model, out, tokenizer)


# Input channels of every q/k/v/gate/up projection that tiny_outlier_llama makes 10× larger than the rest.
OUTLIER_CHANNELS = (3, 50, 97, 130, 171, 200, 222, 250)
OUTLIER_GAIN = 10.0


def tiny_outlier_llama(out: str | Path, *, seed: int = 0) -> Path:
    """A tiny Llama for calibrated-quantization tests: rows of 256 (k-quants apply whole), unit-gain projections
    (quantization error is not amplified layer by layer as with tiny_llama's large random weights), and
    :data:`OUTLIER_CHANNELS` of every q/k/v/gate/up input :data:`OUTLIER_GAIN`× larger than the rest (their
    RMSNorm weights scaled), as trained LLMs have them: round-to-nearest gives those columns the same error as any
    other and the large inputs multiply it; a quantizer that knows the inputs (imatrix, GPTQ) does not."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    tiny_llama(out, seed=seed, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
    weights = load_file(str(out / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            weights[name] = w / (0.15 * w.shape[1] ** 0.5)  # tiny_llama draws weights with std 0.15
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"][list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


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


def _finish(model, out: str | Path | None, tokenizer: str = "gpt2"):
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
        if tokenizer == "spm":
            tok, raw = tiny_sentencepiece_tokenizer(model.config.vocab_size)
            tok.save_pretrained(out)
            (out / "tokenizer.model").write_bytes(raw)
        else:
            tiny_tokenizer(model.config.vocab_size, tokenizer).save_pretrained(out)
    return model
