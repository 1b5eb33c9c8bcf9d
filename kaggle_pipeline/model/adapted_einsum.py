"""A frozen projection plus its LoRA update: einsum(x, W) + scale * (x A) B.

Two ways to compute the same thing:
- separate: the base matmul and the low-rank path, added. Needed when LoRA dropout is active
  (the low-rank path sees a different input) and in bf16 (a small update vanishes when added
  to bf16 weights).
- merged: one matmul against W + scale * A B, with a hand-written backward that takes the
  factors' gradients through the rank-r path (autodiff would form the full weight gradient,
  a matmul as large as the forward). One large matmul instead of a large and two thin ones
  plus an activation-sized add, each way: the thin matmuls and the adds are memory-bound.

The subscripts of A and B follow from the projection's: A maps x's contracted dimensions to
the rank r, B maps r to the weight's output dimensions (q: "BTD,NDH->BTNH" gives A "Dr",
B "rNH", as in `kaggle_pipeline.model.lora`).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp

from kaggle_pipeline.model.precision import einsum

RANK = "r"


class Subscripts(typing.NamedTuple):
    x: str
    w: str
    y: str
    a: str
    b: str
    low: str  # x A: x's free dimensions, then r

    @property
    def merge(self) -> str:
        return f"{self.a},{self.b}->{self.w}"


@functools.cache
def subscripts(eqn: str) -> Subscripts:
    inputs, y = eqn.replace(" ", "").split("->")
    x, w = inputs.split(",")
    if RANK in eqn:
        raise ValueError(f"einsum {eqn!r} uses {RANK!r}, reserved for the LoRA rank")
    contracted = "".join(c for c in x if c in w)
    return Subscripts(x=x, w=w, y=y, a=contracted + RANK,
                      b=RANK + "".join(c for c in w if c not in x),
                      low="".join(c for c in x if c not in w) + RANK)


def lora_update(eqn: str, x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * (x A) B, shaped like einsum(eqn, x, W), in f32 (operands in x's dtype)."""
    s = subscripts(eqn)
    low = einsum(f"{s.x},{s.a}->{s.low}", x, a.astype(x.dtype)).astype(x.dtype)
    return scale * einsum(f"{s.low},{s.b}->{s.y}", low, b.astype(x.dtype))


def separate(eqn: str, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
             scale: float) -> jax.Array:
    """The base matmul plus the low-rank path, added in f32."""
    return einsum(eqn, x, w.astype(x.dtype)) + lora_update(eqn, x, a, b, scale)


def merged(eqn: str, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
           scale: float) -> jax.Array:
    """Same value as `separate`, as one matmul; no gradient flows to the frozen w."""
    return _merged(eqn, scale, x, w, a, b)


def merged_weight(eqn: str, scale: float, w: jax.Array, a: jax.Array, b: jax.Array,
                  dtype) -> jax.Array:
    """W + scale·A·B in `dtype`: the weight the merged matmul multiplies by."""
    s = subscripts(eqn)
    return w.astype(dtype) + scale * jnp.einsum(s.merge, a.astype(dtype), b.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _merged(eqn, scale, x, w, a, b):
    return einsum(eqn, x, merged_weight(eqn, scale, w, a, b, x.dtype)).astype(x.dtype)


def _merged_fwd(eqn, scale, x, w, a, b):
    # Keep the inputs, not the merged weight: it is recomputed in the backward (a rank-r
    # product), so a large model does not hold a second copy of every adapted weight.
    return _merged(eqn, scale, x, w, a, b), (x, w, a, b)


def _merged_bwd(eqn, scale, residuals, dy):
    x, w, a, b = residuals
    s = subscripts(eqn)
    dx = einsum(f"{s.y},{s.w}->{s.x}", dy, merged_weight(eqn, scale, w, a, b, x.dtype))
    low = einsum(f"{s.x},{s.a}->{s.low}", x, a.astype(x.dtype))  # x A
    dlow = einsum(f"{s.y},{s.b}->{s.low}", dy, b.astype(dy.dtype))  # dy B^T
    da = scale * einsum(f"{s.x},{s.low}->{s.a}", x, dlow)
    db = scale * einsum(f"{s.low},{s.y}->{s.b}", low, dy)
    return dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype)


_merged.defvjp(_merged_fwd, _merged_bwd)
