"""The precision policy: which dtypes "auto" means on the machine a run is on.

Accelerators (TPU, GPU) compute in bfloat16 with f32 accumulation: every matmul takes bf16
operands and returns f32 (`preferred_element_type`), softmax, norms and the loss run in f32, the
trainable weights (LoRA factors, or the master copy in full fine-tuning) and the optimizer state
stay f32. A CPU gets the same policy only when its matrix units run bf16 faster than f32: with
AMX, XLA hands a bf16 dot that accumulates in f32 to oneDNN (issue 10 measured 1148 against
249 GFLOP/s). Without AMX (avx512_bf16 alone has not been measured; plain AVX2 runs bf16 dots
at or below the f32 rate) "auto" is f32, and the f32 job is exactly what it was before.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

AUTO = "auto"
ACCUMULATE = jnp.float32  # what every matmul accumulates (and returns) in
# CPU flags (/proc/cpuinfo) under which "auto" means bfloat16 on a CPU.
CPU_BF16_FLAGS = frozenset({"amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def fast_bf16(platform: str | None = None) -> bool:
    """Whether bf16 matmuls (f32 accumulation) beat f32 on `platform` (default: jax's)."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return bool(CPU_BF16_FLAGS & cpu_flags())
    return True  # tpu, gpu (cuda, rocm)


def resolve(name: str, platform: str | None = None) -> jnp.dtype:
    """A config dtype ("auto", "float32", "bfloat16") as a jnp dtype for `platform`."""
    if name == AUTO:
        return jnp.dtype(jnp.bfloat16 if fast_bf16(platform) else jnp.float32)
    return jnp.dtype(name)


def einsum(eqn: str, x: jax.Array, y: jax.Array, name: str = "projection") -> jax.Array:
    """jnp.einsum accumulating in f32: f32 out of bf16 operands, the same dot as before in f32.

    With bf16 operands the backward's matmuls take bf16 operands too: autodiff would hand them
    the f32 cotangent, and XLA runs an f32 x bf16 dot as an f32 one (on a CPU: upcast, never
    oneDNN/AMX; scripts/onednn_dots.py). That product is a custom VJP, which remat policies
    looking for dots do not see: its output carries `name` ("projection", "attention") for the
    policies of model/transformer.py.
    """
    if x.dtype == y.dtype and x.dtype != ACCUMULATE and _transposable(eqn):
        return checkpoint_name(_low_einsum(eqn, x, y), name)
    return jnp.einsum(eqn, x, y, preferred_element_type=ACCUMULATE)


@functools.cache
def _transposable(eqn: str) -> bool:
    """Each operand's gradient is itself one einsum of the other operand and the cotangent."""
    if "..." in eqn or "->" not in eqn:
        return False
    inputs, out = eqn.replace(" ", "").split("->")
    a, b = inputs.split(",")
    return set(a) <= set(b) | set(out) and set(b) <= set(a) | set(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_einsum(eqn: str, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, x, y, preferred_element_type=ACCUMULATE)


def _low_einsum_fwd(eqn, x, y):
    return _low_einsum(eqn, x, y), (x, y)


def _low_einsum_bwd(eqn, residuals, g):
    x, y = residuals
    inputs, out = eqn.replace(" ", "").split("->")
    a, b = inputs.split(",")
    g = g.astype(x.dtype)  # the cotangent in the operands' dtype, accumulated in f32 again
    dx = jnp.einsum(f"{out},{b}->{a}", g, y, preferred_element_type=ACCUMULATE)
    dy = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=ACCUMULATE)
    return dx.astype(x.dtype), dy.astype(y.dtype)


_low_einsum.defvjp(_low_einsum_fwd, _low_einsum_bwd)
