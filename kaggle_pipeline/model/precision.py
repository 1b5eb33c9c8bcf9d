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


def einsum(eqn: str, *operands: jax.Array) -> jax.Array:
    """jnp.einsum accumulating in f32: f32 out of bf16 operands, the same dot as before in f32."""
    return jnp.einsum(eqn, *operands, preferred_element_type=ACCUMULATE)
