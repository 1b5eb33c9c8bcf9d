"""Small building blocks: weights with named einsums, RMSNorm, LoRA deltas."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Collection that holds LoRA factors, kept apart from the frozen base `params`.
LORA = "lora"


class Einsum(nn.Module):
    """A weight applied by an einsum; stored in its param dtype, used in the compute dtype."""

    shape: tuple[int, ...]
    weight_name: str = "w"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape)
        return jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))


class RMSNorm(nn.Module):
    """RMSNorm with a zero-initialised scale applied as (1 + scale)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        # Normalise in f32 whatever the compute dtype: bf16 variance loses too much.
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(var + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def lora_delta(module: nn.Module, name: str, x: jax.Array, eqn_a: str, eqn_b: str, *,
               scale: float, dropout: float, deterministic: bool) -> jax.Array | None:
    """scale * B(A(dropout(x))) if the module holds LoRA factors `name`, else None.

    The factors live in the `lora` collection as {name: {"a": ..., "b": ...}}; their presence,
    not a flag, decides whether the projection is adapted.
    """
    if not module.has_variable(LORA, name):
        return None
    factors = module.get_variable(LORA, name)
    if dropout > 0.0 and not deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    dtype = x.dtype
    low = jnp.einsum(eqn_a, x, factors["a"].astype(dtype))
    return scale * jnp.einsum(eqn_b, low, factors["b"].astype(dtype))
