"""amoeba-export: elastic subnets of Llama-family LLMs, exported to GGUF, ONNX and ExecuTorch.

The package itself imports nothing heavy, so the child processes that host a native runtime (see
``backends/isolation.py``) and the CLI start quickly. Importing ``amoeba_export.hf`` registers the per-layer-width
model class (``amoeba_llama``) with transformers' Auto classes; every loader in ``modelio`` does that first, and
extracted folders also load anywhere with ``trust_remote_code=True`` (the model code travels inside them).
"""

__version__ = "0.1.0"
