"""Rotary position embeddings, split-halves layout as in DeepMind's reference."""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
    """Rotates x [B, T, N, H] by positions [B, T]; scale > 1 interpolates positions."""
    head_dim = x.shape[-1]
    fraction = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    timescale = base**fraction
    angles = positions[..., None].astype(jnp.float32) / timescale / scale  # B T H/2
    angles = angles[..., None, :]  # B T 1 H/2
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
