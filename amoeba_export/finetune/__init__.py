"""Elastic fine-tuning: shape-aware mixture of LoRAs (SMoL) + in-place distillation, on accelerate."""

from .checkpoint import load_trained_elastic
from .config import SMoLConfig, TrainConfig
from .model import SMoLModel, merge_for_shape

__all__ = ["SMoLConfig", "SMoLModel", "TrainConfig", "load_trained_elastic", "merge_for_shape"]
