"""Gemma 2 / Gemma 3 text transformer in low-level Flax (linen)."""

from kaggle_pipeline.model.kv_cache import init_cache
from kaggle_pipeline.model.transformer import Transformer, abstract_params, init_params

__all__ = ["Transformer", "abstract_params", "init_cache", "init_params"]
