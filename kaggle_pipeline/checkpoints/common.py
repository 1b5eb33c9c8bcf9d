"""What every checkpoint loader shares: the expected tree, clear mismatch errors, placement."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.config import ModelConfig
from kaggle_pipeline.model import abstract_params


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model config."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """'layer_0/attn/q_einsum/w' -> shape, for every param the config needs."""
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(config)).items()}


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    return path


def build_params(
    config: ModelConfig,
    source: str,
    fetch: Callable[[str], np.ndarray | None],
    dtype: jnp.dtype = jnp.float32,
    shardings: Mapping | None = None,
) -> dict:
    """Builds the param tree one tensor at a time: fetch(path) -> array or None if absent.

    Each tensor is checked, cast and placed (on its sharding if given) before the next is read,
    so no full f32 copy of the model ever exists.
    """
    flat_shardings = flatten(shardings) if shardings is not None else {}
    out = {}
    for path, shape in expected_shapes(config).items():
        array = fetch(path)
        if array is None:
            raise CheckpointError(f"{source}: missing weight for '{path}' (expected shape {shape})")
        if tuple(array.shape) != shape:
            raise CheckpointError(
                f"{source}: weight '{path}' has shape {tuple(array.shape)}, "
                f"the config expects {shape}")
        array = np.asarray(array).astype(jnp.dtype(dtype), copy=False)
        # device_put (sharding None = default device): jnp.asarray briefly holds a second copy.
        out[path] = jax.device_put(array, flat_shardings.get(path))
        del array
    return unflatten(out)
