"""The elastic core: one model, any depth × width, by real slicing."""

from .linear import ElasticLinear
from .model import ElasticBlock, ElasticLM, LayerWidth, make_elastic

__all__ = ["ElasticBlock", "ElasticLM", "ElasticLinear", "LayerWidth", "make_elastic"]
