"""Small building blocks: named projection weights, RMSNorm, projections with their LoRA update."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.model import adapted_einsum
from kaggle_pipeline.model.precision import einsum

# Collection that holds LoRA factors, kept apart from the frozen base `params`.
LORA = "lora"
# Collection of the decode loop's merged projection matrices (model/decode_layout.py).
DECODE = "decode"


class Einsum(nn.Module):
    """A projection weight under its own scope (`q_einsum/w`), as the official layout nests it.
    The owner applies it, with its LoRA update, through `project`."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    def setup(self):
        self.weight = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape)


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


def gather_positions(x: jax.Array, at: jax.Array) -> jax.Array:
    """x [B, T, ...] at positions `at` [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """How the LoRA factors a module finds in the `lora` collection are applied."""

    scale: float = 1.0  # alpha / rank
    dropout: float = 0.0  # on the low-rank path's input, when not deterministic
    deterministic: bool = True


def project(module: nn.Module, name: str, eqn: str, x: jax.Array, w: jax.Array,
            adapt: Adaptation) -> jax.Array:
    """einsum(eqn, x, w), plus scale * B(A(dropout(x))) if the module holds LoRA factors `name`.

    The factors live in the `lora` collection as {name: {"a": ..., "b": ...}}; their presence,
    not a flag, decides whether the projection is adapted. x is already in the compute dtype;
    the matmuls accumulate in f32 and the result comes back in x's dtype.
    """
    if not module.has_variable(LORA, name):
        return einsum(eqn, x, w.astype(x.dtype)).astype(x.dtype)
    factors = module.get_variable(LORA, name)
    a, b = factors["a"], factors["b"]
    if adapt.dropout > 0.0 and not adapt.deterministic:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - adapt.dropout, x.shape)
        dropped = jnp.where(keep, x / (1.0 - adapt.dropout), 0.0)
        y = einsum(eqn, x, w.astype(x.dtype)) + adapted_einsum.lora_update(
            eqn, dropped, a, b, adapt.scale)
    elif x.dtype == jnp.float32:
        y = adapted_einsum.merged(eqn, x, w, a, b, adapt.scale)
    else:
        y = adapted_einsum.separate(eqn, x, w, a, b, adapt.scale)
    return y.astype(x.dtype)
