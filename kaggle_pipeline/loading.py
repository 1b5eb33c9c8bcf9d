"""Model section of a run config -> (model config, params, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from kaggle_pipeline.checkpoints import load_checkpoint
from kaggle_pipeline.config import ModelConfig, get_config, tiny_config
from kaggle_pipeline.model import init_params
from kaggle_pipeline.run_config import ModelSection, resolve_input
from kaggle_pipeline.tokenizer import Tokenizer

PACKAGED_MODEL = "gemma3-270m-gguf"


def _preset(name: str) -> ModelConfig:
    if name.startswith("tiny-"):  # tiny-gemma2 / tiny-gemma3 with the real 262k vocabulary
        return tiny_config(name.removeprefix("tiny-"), vocab_size=262_144)
    return get_config(name)


def checkpoint_path(section: ModelSection) -> Path | None:
    if not section.checkpoint:
        return None
    if section.checkpoint == PACKAGED_MODEL:
        from kaggle_pipeline.assets import gemma3_270m_gguf

        return gemma3_270m_gguf()
    return resolve_input(section.checkpoint)


def load_tokenizer(section: ModelSection) -> Tokenizer:
    if section.tokenizer:
        return Tokenizer.from_model_file(resolve_input(section.tokenizer))
    path = checkpoint_path(section)
    if path is None:
        from kaggle_pipeline.assets import gemma3_270m_gguf

        return Tokenizer.from_gguf(gemma3_270m_gguf())  # random-weight runs borrow Gemma 3's
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.exists():
            return Tokenizer.from_model_file(candidate)
    raise FileNotFoundError(f"no tokenizer.model in or next to {path}; set model.tokenizer")


def load_model(section: ModelSection, *, seed: int = 0, shardings=None
               ) -> tuple[ModelConfig, dict]:
    dtype = jnp.dtype(section.param_dtype)
    path = checkpoint_path(section)
    preset = _preset(section.preset) if section.preset else None
    if path is None:
        if preset is None:
            raise ValueError("model.checkpoint is empty: set model.preset to start from random "
                             "weights")
        params = init_params(preset, jax.random.key(seed), dtype)
        return preset, params
    return load_checkpoint(path, config=preset, dtype=dtype, shardings=shardings)
