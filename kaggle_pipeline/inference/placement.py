"""Inference on the training mesh: weights placed by model/sharding.py's rule table (fsdp and
model axes), prompts split over the data and fsdp axes, the KV cache sharded like the
activations (batch, kv heads). A dimension the mesh does not divide stays replicated."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kaggle_pipeline.model import Transformer, decode_layout, sharding
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.kv_cache import CACHE_AXES
from kaggle_pipeline.model.layers import DECODE


def place_variables(variables: dict, mesh: Mesh, config: ModelConfig) -> dict:
    """The model's variables ({"params", "lora"}) on `mesh`; arrays already placed there are
    not copied."""
    shardings = sharding.param_shardings(variables, mesh, config.transpose_gating_einsum)
    return jax.device_put(variables, shardings)


def prepare(model: Transformer, variables: dict, mesh: Mesh | None) -> dict:
    """The variables inference runs on: placed on `mesh` by the rule table and, with f32 compute
    on one device, with the held projection matrices of model/decode_layout.py (LoRA merged
    once, q/k/v and gate/up one matmul each; BENCHMARKS.md §3) beside the params, in place of
    the LoRA factors. Variables already prepared are returned as they are."""
    if DECODE in variables:
        return variables
    if mesh is not None:
        variables = place_variables(variables, mesh, model.config)
    single = mesh is None or mesh.size == 1
    if not single or not decode_layout.applies(variables, model.dtype):
        return variables
    return {"params": variables["params"], DECODE: _hold(model)(variables)}


@functools.lru_cache(maxsize=8)
def _hold(model: Transformer):
    return jax.jit(functools.partial(decode_layout.hold, model.config,
                                     lora_scale=model.lora_scale))


def batch_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data and fsdp, the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, sharding.spec_for(axes, tuple(shape), mesh))


def place_batch(arrays: Sequence[np.ndarray], mesh: Mesh) -> tuple[jax.Array, ...]:
    """Host arrays whose first axis is the batch, split over the mesh. Every process passes the
    same global arrays and copies only its own devices' shards."""
    placed = []
    for a in arrays:
        placed.append(sharding.global_batch_to_arrays({"a": a}, batch_sharding(a.shape, mesh))["a"])
    return tuple(placed)


def cache_axes(cache: dict) -> dict:
    """The logical axes of every array of a KV cache (kv_cache.CACHE_AXES per layer)."""
    return {name: {key: CACHE_AXES[key] for key in layer} for name, layer in cache.items()}


def constrain(tree: dict, axes: dict, mesh: Mesh) -> dict:
    """with_sharding_constraint on every leaf, from its logical axes through the rule table."""
    def one(leaf, leaf_axes):
        spec = sharding.spec_for(leaf_axes, tuple(leaf.shape), mesh)
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))
    return jax.tree.map(one, tree, axes, is_leaf=lambda x: isinstance(x, tuple))
