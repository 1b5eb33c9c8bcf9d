"""What every checkpoint loader shares: the expected tree, clear mismatch errors, placement."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.errors import UserError
from kaggle_pipeline.model import abstract_params, layer_stack
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.sharding import param_shardings

# XLA's CPU client adopts a host buffer aligned like this in jax.device_put instead of copying
# it: with every tensor handed over this way, loading holds one copy of the model, not two.
_ALIGNMENT = 64


class CheckpointError(UserError):
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


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_into(file: BinaryIO, offset: int, buffer: np.ndarray) -> None:
    """Fills the contiguous `buffer` with the file's bytes from `offset`. Plain reads leave
    nothing resident; a memory mapping's touched pages would count in RSS next to our copy."""
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):  # a read may return less than asked (Linux: at most ~2 GiB)
        count = os.preadv(file.fileno(), [view[done:]], offset + done)
        if count == 0:
            raise CheckpointError(f"{file.name}: the file ends at byte {offset + done}, inside "
                                  "a tensor's data")
        done += count


def _adoptable(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` in `dtype` as a buffer device_put can adopt: itself if it already is one (writeable,
    so not a file mapping or another jax array's memory), else a cast copy."""
    if (array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
            and array.ctypes.data % _ALIGNMENT == 0):
        return array
    out = aligned_empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")  # the cast astype() would make
    return out


def build_params(
    config: ModelConfig,
    source: str,
    fetch: Callable[[str], np.ndarray | None],
    dtype: jnp.dtype = jnp.float32,
    shardings: Mapping | None = None,
    *,
    mesh=None,
    scan_layers: bool = False,
) -> dict:
    """Builds the param tree one tensor at a time: fetch(path) -> array or None if absent,
    `path` in the official per-layer layout ('layer_3/attn/q_einsum/w').

    Each tensor is checked, cast and placed before the next is read, so no full f32 copy of the
    model ever exists: on `mesh`, each goes straight to its sharding by the rule table
    (model/sharding.py), so no device holds more than its shards (`shardings`, a tree like the
    params, overrides the rules). With `scan_layers` the layers are stacked on the way in
    (model/layer_stack.py): each stacked tensor is filled on the host one layer at a time, then
    placed. fetch hands its arrays over: on CPU the params may share their memory (fetch
    returning aligned arrays of `dtype` saves a copy).
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    wanted = abstract_params(config, dtype, scan_layers)
    if shardings is None and mesh is not None:
        shardings = param_shardings(wanted, mesh, config.transpose_gating_einsum)
    flat_shardings = flatten(shardings) if shardings is not None else {}
    expected = expected_shapes(config)
    period = layer_stack.layout(config).period

    def get(path: str) -> np.ndarray:
        shape = expected[path]
        array = fetch(path)
        if array is None:
            raise CheckpointError(f"{source}: missing weight for '{path}' (expected shape {shape})")
        if tuple(array.shape) != shape:
            raise CheckpointError(
                f"{source}: weight '{path}' has shape {tuple(array.shape)}, "
                f"the config expects {shape}")
        return np.asarray(array)

    out = {}
    for path, leaf in flatten(wanted).items():
        if path.startswith(layer_stack.STACK + "/"):
            _, slot, rest = path.split("/", 2)
            j = int(slot.removeprefix("attention_type_"))
            array = aligned_empty(tuple(leaf.shape), np_dtype)
            for g in range(leaf.shape[0]):
                np.copyto(array[g], get(f"layer_{g * period + j}/{rest}"), casting="unsafe")
        else:
            array = _adoptable(get(path), np_dtype)
        # device_put (sharding None = default device) adopts it on CPU; jnp.asarray would copy.
        out[path] = jax.device_put(array, flat_shardings.get(path))
        del array
    return unflatten(out)
