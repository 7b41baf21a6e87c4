"""Loading and saving plain HF checkpoints (safetensors only, never pickle)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import ARCHITECTURES, architecture
from .artifacts import atomic_dir, read_meta, sha256_file, write_meta
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# model_type -> causal-LM class name, from the one table of what each stage supports (amoeba_export.architectures).
SUPPORTED_ARCHITECTURES: dict[str, str] = {t: a.hf_class for t, a in ARCHITECTURES.items()}


def check_architecture(config: Any, stage: str | None = None) -> None:
    """Raise UnsupportedArchitectureError (quoting the table) unless ``stage`` (None: some stage) takes it."""
    architecture(getattr(config, "model_type", None), stage)


def resolve_model(spec: str | Path | None) -> Path:
    """A local HF folder for ``spec``: None/'default' → the shipped model; a .gguf → converted once."""
    from .resources import default_model_dir

    if spec is None or str(spec) == "default":
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .paths import cache_subdir

        out = cache_subdir("models") / f"{path.stem}-{sha256_file(path)[:12]}"
        if (out / "meta.json").is_file():
            return out
        return convert_gguf_to_hf(path, out, name=path.stem)
    if not path.is_dir():
        raise CheckpointError(f"model {spec} not found", fix="pass an HF model folder, a .gguf file or 'default'")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json", fix="pass a folder written by save_pretrained")
    check_config_file(path)  # before a tokenizer or model loader meets it and blames something else
    return path


# Integer fields every Llama-family config.json must hold (positive), checked before transformers reads it:
# transformers accepts "four" or a list there and fails later with a traceback far from the cause.
CONFIG_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def config_problems(cfg: Any) -> list[str]:
    """Every problem of a parsed config.json that would otherwise surface as a traceback later."""
    if not isinstance(cfg, dict):
        return [f"config.json holds a JSON {type(cfg).__name__}, not an object"]
    out = []
    for key in (*CONFIG_INTS, "num_key_value_heads", "head_dim"):
        value = cfg.get(key)
        if value is None and key not in CONFIG_INTS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            out.append(f"{key} must be a positive integer, got {value!r}")
    if out:
        return out
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv:
        out.append(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        out.append(f"hidden_size ({cfg['hidden_size']}) is not a multiple of num_attention_heads ({heads}) "
                   "and no head_dim is given")
    return out


def check_config_file(path: str | Path) -> None:
    """Raise one CheckpointError naming every problem of ``path``/config.json (see :func:`config_problems`)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}/config.json: {exc}", fix="re-create the checkpoint") from exc
    if isinstance(raw, dict):  # an architecture we do not slice is that error, not its fields' names
        from types import SimpleNamespace

        check_architecture(SimpleNamespace(model_type=raw.get("model_type")))
    if problems := config_problems(raw):
        raise CheckpointError(f"{path}/config.json: " + "; ".join(problems),
                              fix="fix config.json or re-save the model with save_pretrained")


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    from . import hf  # noqa: F401  (registers amoeba_llama with the Auto classes)

    check_config_file(path)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the config in {path}: {exc}", fix="re-create the checkpoint") from exc


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a local folder in eval mode (fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import hf  # noqa: F401

    path = resolve_model(path)
    config = load_config(path)
    check_architecture(config)
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} holds no .safetensors weights", fix="save the model with safetensors")
    try:
        # use_safetensors: never fall back to a pytorch_model.bin (pickle) beside a stray .safetensors file
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, use_safetensors=True)
    except Exception as exc:  # transformers raises many types for a damaged folder
        raise CheckpointError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}",
                              fix="re-create or re-download the checkpoint") from exc
    return model.eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {exc}", fix="copy the tokenizer files") from exc


def convert_gguf_to_hf(gguf_file: Path, out: Path, *, name: str) -> Path:
    """Dequantize a GGUF with transformers and save it once as a plain safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_file = Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise CheckpointError(f"cannot convert {gguf_file}: {type(exc).__name__}: {exc}",
                              fix="pass a Llama-family GGUF file") from exc
    check_architecture(model.config)
    # The weights are now dequantized fp32: the GGUF's quantization no longer applies.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config.dtype = "float32"
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_meta(tmp, {
            "kind": "hf_model",
            "version": 1,
            "name": name,
            "source": str(gguf_file),
            "source_sha256": sha256_file(gguf_file),
            "convert_seconds": round(time.perf_counter() - start, 1),
        })
    return out


def model_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of an amoeba-written model folder, or {} for a user's folder."""
    try:
        return read_meta(path)
    except CheckpointError:
        return {}
