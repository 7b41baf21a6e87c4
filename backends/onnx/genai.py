"""``genai_config.json``: what onnxruntime-genai needs to run the exported decoder.

The tensor names follow its model builder (``past_key_values.%d.key`` in, ``present.%d.key`` out); the graph
concatenates past and new keys itself, so the past/present buffers are not shared.
"""

from __future__ import annotations

from typing import Any

GENAI_CONFIG = "genai_config.json"


def genai_config(hf_config: dict[str, Any], summary: dict[str, Any], *, model_file: str,
                 threads: int | None = None) -> dict[str, Any]:
    """The config for a decoder whose layers all have the same widths (onnxruntime-genai has one KV width)."""
    context = int(hf_config.get("max_position_embeddings") or 2048)
    eos = hf_config.get("eos_token_id")
    pad = hf_config.get("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    options = {"intra_op_num_threads": threads} if threads else {}
    return {
        "model": {
            "bos_token_id": hf_config.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], **options},
                "filename": model_file,
                "head_size": summary["head_dim"],
                "hidden_size": summary["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": max(summary["q_heads"]),
                "num_hidden_layers": summary["layers"],
                "num_key_value_heads": max(summary["kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": summary["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
