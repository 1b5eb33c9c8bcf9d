"""KV cache: one ring buffer per layer; sliding-window layers keep only their window.

A layer cache is {"k": [B, S, K, H], "v": [B, S, K, H], "pos": [B, S]} where `pos` is the
absolute position held in each slot (-1 when empty). Token at position p lives in slot p % S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kaggle_pipeline.model.config import AttentionKind, ModelConfig

LayerCache = dict[str, jax.Array]
Cache = dict[str, LayerCache]


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
        }
    return cache


def fill_from_prefill(cache: LayerCache, k: jax.Array, v: jax.Array,
                      lengths: jax.Array) -> LayerCache:
    """Writes a right-padded prompt (positions 0..len-1) into an empty layer cache.

    Slot s keeps the latest prompt token t < len with t % S == s, so a sliding-window
    layer keeps exactly the last S tokens.
    """
    size = cache["k"].shape[1]
    slots = jnp.arange(size)[None, :]  # 1 S
    last = lengths[:, None] - 1  # B 1
    t = slots + size * jnp.floor_divide(last - slots, size)  # B S
    valid = slots <= last
    t_safe = jnp.clip(t, 0, k.shape[1] - 1)
    take = jax.vmap(lambda a, idx: a[idx])
    valid4 = valid[:, :, None, None]
    return {
        "k": jnp.where(valid4, take(k, t_safe).astype(cache["k"].dtype), cache["k"]),
        "v": jnp.where(valid4, take(v, t_safe).astype(cache["v"].dtype), cache["v"]),
        "pos": jnp.where(valid, t, -1).astype(jnp.int32),
    }


def write_step(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Writes one new token per sequence (k, v [B, 1, K, H], positions [B, 1])."""
    size = cache["k"].shape[1]
    hit = (jnp.arange(size)[None, :] == (positions % size))  # B S
    hit4 = hit[:, :, None, None]
    return {
        "k": jnp.where(hit4, k.astype(cache["k"].dtype), cache["k"]),
        "v": jnp.where(hit4, v.astype(cache["v"].dtype), cache["v"]),
        "pos": jnp.where(hit, positions, cache["pos"]),
    }
