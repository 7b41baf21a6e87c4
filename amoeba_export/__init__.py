"""amoeba-export: elastic subnets of Llama-family LLMs, exported to GGUF, ONNX and ExecuTorch.

Importing the package registers the per-layer-width model class (``amoeba_llama``) with transformers'
Auto classes, so extracted subnets load with ``AutoModelForCausalLM.from_pretrained``.
"""

from . import hf as _hf  # noqa: F401  (Auto-class registration)

__version__ = "0.1.0"
