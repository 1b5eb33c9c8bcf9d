"""Compiling a run's programs on a second thread while the first reads the checkpoint.

Reading and dequantizing the weights keeps one core busy, and so does tracing and compiling the
train step: on 2 cores the two can overlap. A jitted function compiled ahead of time for the
abstract arguments it will get (`jit(f).lower(*shapes).compile()`) keeps the executable in its
own cache, so its first call with arrays of those shapes, dtypes and shardings runs it at once.
Had anything differed, that call would compile as it always does: the result cannot change.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

# One thread: the programs compile one after another, beside the main thread's work. Not a
# daemon, so an early exit waits for a compilation to finish rather than killing it mid-way.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")


def compile_in_background(jitted, *abstract_args) -> Future:
    """Starts compiling `jitted` (a `jax.jit` function) for `abstract_args`
    (ShapeDtypeStructs with their shardings); `.result()` waits for it and raises what compiling
    raised."""
    return _POOL.submit(lambda: jitted.lower(*abstract_args).compile())
