"""Fixtures every test file shares: the checkout's root, the real Gemma 3 tokenizer (read from
the packaged GGUF once per session) and the tiny random models' data."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from kaggle_pipeline import host_malloc
from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.model.lora import init_lora

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"


def pytest_configure(config):
    """The suite runs with the allocator the commands use (tcmalloc when the machine has it; 8%
    faster here): pytest restarts once before its workers start, and they inherit it. Its
    capture of stdout and stderr is undone first, or the new process would write into it."""
    if host_malloc.restart_needed():
        config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
        host_malloc.restart_with_allocator()


def packed_layout(lengths: list[tuple[int, ...]], t: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [len(lengths), t] of rows packed with examples of these
    lengths (segments 1, 2, ..., positions restarting at 0), then padding (segment 0)."""
    segments = np.zeros((len(lengths), t), np.int32)
    positions = np.zeros((len(lengths), t), np.int32)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for s, n in enumerate(row_lengths, start=1):
            segments[row, start:start + n] = s
            positions[row, start:start + n] = np.arange(n)
            start += n
    return segments, positions


def lora_with_values(config, lora_config) -> dict:
    """init_lora's factors (key 1) with every A and B drawn afresh (key 2): B = 0, as init_lora
    makes it, would hide the adapter and make every gradient of A vanish."""
    leaves, tree = jax.tree.flatten(init_lora(config, lora_config, jax.random.key(1)))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves, strict=True)])


@pytest.fixture(scope="session")
def gemma3_tokenizer() -> Tokenizer:
    """Gemma 3's tokenizer, rebuilt from the packaged GGUF (about 4 s) once per session."""
    return Tokenizer.from_gguf(gemma3_270m_gguf())


@pytest.fixture(scope="session")
def gemma3_270m():
    """The real Gemma 3 270M, (config, f32 params) by our GGUF loader, loaded once per session."""
    from kaggle_pipeline.checkpoints import load_checkpoint

    return load_checkpoint(gemma3_270m_gguf())


def _plain_view_reader():
    import gguf
    import numpy as np

    class PlainViewReader(gguf.GGUFReader):
        """The same reader over a plain ndarray view of its memmap: np.memmap slicing runs
        Python hooks, and parsing the 262k-entry vocabulary that way costs ~12 s per load."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, mapped):
            self._data = mapped.view(np.ndarray)

    return PlainViewReader


def _hf_from_gguf(load):
    """load(path) under transformers' own GGUF path, offline, with the faster reader."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", _plain_view_reader())  # transformers imports it per call
        return load(gemma3_270m_gguf())


@pytest.fixture(scope="session")
def hf_gemma3_270m_tokenizer():
    """transformers' tokenizer of the packaged GGUF, built once per session (test process)."""
    import transformers

    return _hf_from_gguf(lambda path: transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name))


@pytest.fixture(scope="session")
def hf_gemma3_270m(hf_gemma3_270m_tokenizer):
    """transformers' tokenizer and dequantized f32 model of the packaged GGUF, loaded once per
    session (test process)."""
    import torch
    import transformers

    model = _hf_from_gguf(lambda path: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager").eval())
    return hf_gemma3_270m_tokenizer, model


# Every program compiled once goes to disk, whatever its size or compile time.
CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole session: the many runs of the same tiny
    shapes (every CLI run's train step, the folds of a cross-validation, subprocesses, which
    inherit it through the environment) compile once. Fresh per session, so nothing stale."""
    import os

    directory = tmp_path_factory.mktemp("jax_cache")
    saved = {name: getattr(jax.config, name)
             for name in ("jax_compilation_cache_dir", *CACHE_SETTINGS)}
    env = {"JAX_COMPILATION_CACHE_DIR": str(directory),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    saved_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    for name, value in CACHE_SETTINGS.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up once per process: start it afresh
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    compilation_cache.reset_cache()
