"""Fixtures every test file shares: the checkout's root, the real Gemma 3 tokenizer (read from
the packaged GGUF once per session) and the tiny random models' data."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
from kaggle_pipeline.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def gemma3_tokenizer() -> Tokenizer:
    """Gemma 3's tokenizer, rebuilt from the packaged GGUF (about 4 s) once per session."""
    return Tokenizer.from_gguf(gemma3_270m_gguf())


# Every program compiled once goes to disk, whatever its size or compile time.
CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="session")
def jax_compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this session: runs of the same shapes (the folds of a
    cross-validation, CLI runs in subprocesses given `JAX_COMPILATION_CACHE_DIR`) compile once."""
    directory = tmp_path_factory.mktemp("jax_cache")
    saved = {name: getattr(jax.config, name)
             for name in ("jax_compilation_cache_dir", *CACHE_SETTINGS)}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    for name, value in CACHE_SETTINGS.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up once per process: start it afresh
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
