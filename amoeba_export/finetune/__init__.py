"""Elastic fine-tuning: shape-aware mixture of LoRAs (SMoL) + in-place distillation, on accelerate.

Exports load lazily (see ``amoeba_export.lazy``), so ``finetune.config`` is read without torch."""

from ..lazy import lazy_exports

__all__ = ["SMoLConfig", "SMoLModel", "TrainConfig", "load_trained_elastic", "merge_for_shape"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "SMoLConfig": "config", "TrainConfig": "config", "SMoLModel": "model", "merge_for_shape": "model",
    "load_trained_elastic": "checkpoint"})
