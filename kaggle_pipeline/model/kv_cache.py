"""KV cache: one buffer of slots per layer, written at one shared slot per decode step.

A layer cache is {"k": [B, S, K, H], "v": [B, S, K, H], "pos": [B, S], "end": []}: `pos` is the
absolute position held in each slot (-1 when empty) and `end` counts the slots written so far,
the same for every row. Prompts come left-padded (right-aligned: the last `lengths[b]` of T
tokens are real), so every row's next token goes to the same slot `end % S`: a
`dynamic_update_slice` that XLA does in place, instead of a select over the whole cache.
Sliding-window layers keep S = window slots as a ring buffer; a row's slots hold consecutive
positions, so the last S slots are exactly its last S tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kaggle_pipeline.model.config import AttentionKind, ModelConfig

LayerCache = dict[str, jax.Array]
Cache = dict[str, LayerCache]

# Logical axes of a layer cache's arrays (model/sharding.py maps them onto the mesh): sharded
# like the activations, batch over data and fsdp, kv heads over model.
CACHE_AXES = {"k": ("batch", None, "kv_heads", "head_dim"),
              "v": ("batch", None, "kv_heads", "head_dim"),
              "pos": ("batch", None), "end": ()}


def layer_cache_size(config: ModelConfig, kind: AttentionKind, max_len: int) -> int:
    if kind == AttentionKind.LOCAL:
        return min(config.sliding_window, max_len)
    return max_len


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype = jnp.float32) -> Cache:
    """An empty cache able to hold max_len positions per sequence."""
    cache = {}
    for i, kind in enumerate(config.attention_kinds):
        size = layer_cache_size(config, kind, max_len)
        shape = (batch_size, size, config.num_kv_heads, config.head_dim)
        cache[f"layer_{i}"] = {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch_size, size), -1, jnp.int32),
            "end": jnp.zeros((), jnp.int32),
        }
    return cache


def prompt_positions(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """(positions, segment_ids) [B, width] of left-padded prompts of `lengths` tokens: padding
    has segment 0 and position 0, real tokens positions 0..len-1."""
    start = width - lengths[:, None]
    slots = jnp.arange(width)[None, :]
    real = slots >= start
    return jnp.where(real, slots - start, 0), real.astype(jnp.int32)


def fill_from_prefill(cache: LayerCache, k: jax.Array, v: jax.Array,
                      lengths: jax.Array) -> LayerCache:
    """Writes a block of T left-padded prompt tokens (k, v [B, T, K, H]) into an empty layer
    cache. Slot t % S holds token t; a cache smaller than T keeps the last S tokens."""
    size, width = cache["k"].shape[1], k.shape[1]
    positions, segment_ids = prompt_positions(lengths, width)
    pos = jnp.where(segment_ids == 1, positions, -1)
    if width > size:  # keep tokens width-S..width-1, token t in slot t % S
        shift = (width - size) % size
        k, v, pos = (jnp.roll(a[:, width - size:], shift, axis=1) for a in (k, v, pos))
    dtype = cache["k"].dtype
    return {
        "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(dtype), 0, axis=1),
        "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(dtype), 0, axis=1),
        "pos": jax.lax.dynamic_update_slice_in_dim(cache["pos"], pos.astype(jnp.int32), 0,
                                                   axis=1),
        "end": jnp.asarray(width, jnp.int32),
    }


def write_step(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Writes one new token per sequence (k, v [B, 1, K, H], positions [B, 1]) at the shared
    slot end % S, in place."""
    slot = cache["end"] % cache["k"].shape[1]
    dtype = cache["k"].dtype
    return {
        "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(dtype), slot, axis=1),
        "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(dtype), slot, axis=1),
        "pos": jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions.astype(jnp.int32),
                                                   slot, axis=1),
        "end": cache["end"] + 1,
    }
