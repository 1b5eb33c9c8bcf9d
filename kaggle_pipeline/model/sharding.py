"""Device mesh and the one rule table that maps logical axis names to mesh axes (MaxText style).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params sharded along it),
`model` (tensor parallel over heads / MLP width / vocabulary). A dimension whose size the mesh
axis does not divide is replicated instead (Gemma 2 2B's 4 kv heads on an 8-way model axis).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kaggle_pipeline.model.kv_cache import CACHE_AXES
from kaggle_pipeline.model.layer_stack import STACK
from kaggle_pipeline.model.lora import TARGETS

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axis (or axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "model",
    "embed": "fsdp",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "head_dim": None,
    "stack": None,
    "norm": None,
    "lora": None,
    "layers": None,  # the scan axis of stacked layers (model/layer_stack.py)
    "cache_length": None,
}

# param path pattern -> logical axes of its dimensions
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embedder/input_embedding$", ("vocab", "embed")),
    (r"attn/q_einsum/w$", ("heads", "embed", "head_dim")),
    (r"attn/kv_einsum/w$", ("stack", "kv_heads", "embed", "head_dim")),
    (r"attn/qkv_einsum/w$", ("stack", "heads", "embed", "head_dim")),
    (r"attn/attn_vec_einsum/w$", ("heads", "head_dim", "embed")),
    (r"mlp/linear$", ("mlp", "embed")),
    (r"scale$", ("norm",)),
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: list | None = None) -> Mesh:
    """A (data, fsdp, model) mesh; -1 for data takes the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * model):
            raise ValueError(f"{len(devices)} devices do not split into "
                             f"fsdp={fsdp} x model={model}")
        data = len(devices) // (fsdp * model)
    if data * fsdp * model != len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{model} needs {data * fsdp * model} devices, "
                         f"there are {len(devices)}")
    # Built from a device array, the mesh keeps automatic axis types (jit propagates shardings).
    return Mesh(np.asarray(devices).reshape(data, fsdp, model), MESH_AXES)


def logical_axes(path: str, ndim: int, transpose_gating: bool = False) -> tuple[str | None, ...]:
    """Logical axes of a param (or LoRA factor) by its path; a stacked layer's param has the
    `layers` axis in front of its per-layer axes."""
    if f"/{STACK}/" in f"/{path}":
        return ("layers", *_layer_axes(path, ndim - 1, transpose_gating))
    return _layer_axes(path, ndim, transpose_gating)


def _layer_axes(path: str, ndim: int, transpose_gating: bool) -> tuple[str | None, ...]:
    if re.search(r"mlp/gating_einsum$", path):
        return ("stack", "mlp", "embed") if transpose_gating else ("stack", "embed", "mlp")
    if "/lora/" in f"/{path}" or re.search(rf"/({'|'.join(TARGETS)})/(a|b)$", path):
        return ("lora",) * ndim
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            return axes
    return (None,) * ndim


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec from logical axes through RULES, replicating what does not divide."""
    used: set[str] = set()
    parts = []
    for name, size in zip(axes, shape, strict=True):
        target = RULES.get(name) if name else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        ways = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % ways:
            parts.append(None)
            continue
        used.update(mesh_axes)
        parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*parts)


def _path_str(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keypath)


def param_shardings(tree, mesh: Mesh, transpose_gating: bool = False):
    """NamedSharding for every leaf of a param (or LoRA) tree, by its path."""
    def one(keypath, leaf):
        path = _path_str(keypath)
        axes = logical_axes(path, len(leaf.shape), transpose_gating)
        return NamedSharding(mesh, spec_for(axes, tuple(leaf.shape), mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def like_params_shardings(tree, params_shardings_flat: Mapping[str, NamedSharding], mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror params by path suffix;
    anything else (counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, P())

    def one(keypath, leaf):
        path = _path_str(keypath)
        for param_path, sharding in params_shardings_flat.items():
            if path.endswith(param_path) and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated
    return jax.tree_util.tree_map_with_path(one, tree)


def cache_shardings(cache, mesh: Mesh):
    """A KV cache (`init_cache`) laid out like the activations: rows over the batch axes,
    kv heads over `model` (kv_cache.CACHE_AXES, the axes inference/placement.py uses)."""
    def one(keypath, leaf):
        axes = CACHE_AXES[keypath[-1].key]
        return NamedSharding(mesh, spec_for(axes, tuple(leaf.shape), mesh))
    return jax.tree_util.tree_map_with_path(one, cache)


def placed_shapes(tree, shardings):
    """`tree`'s shapes and dtypes with these shardings, nothing allocated: the arguments a
    program is compiled for ahead of time."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> None:
    """Multi-host: join the other processes when the environment says there are any.

    Anywhere: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. Under SLURM or Open MPI with several tasks jax reads its own variables.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
    counts = [os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "SLURM_NTASKS",
                                          "OMPI_COMM_WORLD_SIZE")]
    if not (address or any(c and int(c) > 1 for c in counts)):
        return
    if jax.distributed.is_initialized():
        return
    # jax itself reads only the address from the environment.
    given = {"coordinator_address": address} if address else {}
    for arg, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(name):
            given[arg] = int(os.environ[name])
    jax.distributed.initialize(**given)


def global_batch_to_arrays(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Sharded global arrays from a host batch that every process builds alike (the same global
    order from the seed). Each process copies only the shards its own devices hold: its rows
    when the batch axis spans the processes, the whole batch when it does not (a mesh whose
    data axis stays within one host)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}
