"""The per-layer-width model class, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_amoeba_llama import AmoebaLlamaConfig
from .modeling_amoeba_llama import AmoebaLlamaForCausalLM

AutoConfig.register(AmoebaLlamaConfig.model_type, AmoebaLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(AmoebaLlamaConfig, AmoebaLlamaForCausalLM, exist_ok=True)

# save_pretrained copies both source files next to the weights and writes config.auto_map.
AmoebaLlamaConfig.register_for_auto_class()
AmoebaLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

MODEL_FILES = ("configuration_amoeba_llama.py", "modeling_amoeba_llama.py")

__all__ = ["AmoebaLlamaConfig", "AmoebaLlamaForCausalLM", "MODEL_FILES"]
