"""Small building blocks: weights with named einsums, RMSNorm, LoRA deltas."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.model import adapted_einsum

# Collection that holds LoRA factors, kept apart from the frozen base `params`.
LORA = "lora"


class Einsum(nn.Module):
    """A weight applied by an einsum; stored in its param dtype, used in the compute dtype."""

    shape: tuple[int, ...]
    weight_name: str = "w"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        # Created in setup so the owner can also read it (`.weight`) to adapt it with LoRA.
        self.weight = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape)

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x.astype(self.dtype), self.weight.astype(self.dtype))


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


def project(module: nn.Module, name: str, eqn: str, x: jax.Array, w: jax.Array, *,
            scale: float, dropout: float, deterministic: bool) -> jax.Array:
    """einsum(eqn, x, w), plus scale * B(A(dropout(x))) if the module holds LoRA factors `name`.

    The factors live in the `lora` collection as {name: {"a": ..., "b": ...}}; their presence,
    not a flag, decides whether the projection is adapted. x is already in the compute dtype.
    """
    if not module.has_variable(LORA, name):
        return jnp.einsum(eqn, x, w.astype(x.dtype))
    factors = module.get_variable(LORA, name)
    a, b = factors["a"], factors["b"]
    if dropout > 0.0 and not deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
        dropped = jnp.where(keep, x / (1.0 - dropout), 0.0)
        return jnp.einsum(eqn, x, w.astype(x.dtype)) + adapted_einsum.lora_update(
            eqn, dropped, a, b, scale)
    if x.dtype == jnp.float32:
        return adapted_einsum.merged(eqn, x, w, a, b, scale)
    return adapted_einsum.separate(eqn, x, w, a, b, scale)
