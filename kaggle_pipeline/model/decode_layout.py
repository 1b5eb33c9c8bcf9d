"""The projection weights of a decode loop, merged and laid out once before the loop.

A decode step multiplies a few rows (one token per sequence) by every weight, and at that size
the number and layout of the matmuls decide its speed. In the official layout a step runs seven
matmuls a layer, and inside a `while_loop` XLA:CPU copies the slices of stacked weights
(`kv_einsum[0]`, `gating_einsum[1]`) and the [N, D, H] query projection into the matrices its
dots take, and recomputes W + s·A·B for every adapted projection, every step: it does not hoist
that work out of the loop (layout assignment inserts the copies after loop-invariant code
motion has run).

`hold` does that work once, before the loop: LoRA factors folded in (f32), and per layer four
matrices in the `decode` collection, which the attention and MLP modules use instead of their
official weights when it is present:

    qkv      [N·H + 2·K·H, D]  query, key and value projections in one matmul
    o        [N·H, D]          the output projection (the official [N, H, D], flattened)
    gate_up  [2·F, D]          gate and up in one matmul
    down     [D, F]            the down projection, transposed

(output-major where XLA:CPU's small-row matmuls ran faster that way: BENCHMARKS.md §3). The
values are the same matmuls' values; only where and how often the work happens changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kaggle_pipeline.model import adapted_einsum
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.layer_stack import STACK
from kaggle_pipeline.model.layers import LORA
from kaggle_pipeline.model.lora import TARGETS, target

# The held matrices are a second, f32 copy of the projection weights while generating: 0.4 GB
# for the 270M, 2.8 GB for Gemma 3 1B. Past this, memory matters more than speed (a 2B model in
# f32 on a CPU would need 8 GB more), and decoding keeps the official weights.
MAX_HELD_BYTES = 4 << 30


def applies(variables: dict, dtype: jnp.dtype) -> bool:
    """Held weights are for f32 compute on per-layer params of a small model: in bf16 a merged
    LoRA update would round away (adapted_einsum.separate), scanned params keep their stacked
    layout, and the copy is bounded by MAX_HELD_BYTES."""
    params = variables["params"]
    if jnp.dtype(dtype) != jnp.float32 or STACK in params:
        return False
    layers = [tree for name, tree in params.items() if name.startswith("layer_")]
    return 4 * sum(x.size for x in jax.tree.leaves(layers)) <= MAX_HELD_BYTES


def hold(config: ModelConfig, variables: dict, lora_scale: float) -> dict:
    """The `decode` collection of `variables`, their LoRA factors folded in (see `applies`).
    Made before the decode loop (inference/sampler.Sampler.prepare), once per generation; the
    model then runs on {"params": params, "decode": held}, without the factors."""
    params = variables["params"]
    lora = variables.get(LORA, {})
    held = {}
    for name, layer in params.items():
        if not name.startswith("layer_"):
            continue
        w = _projections(config, layer, lora.get(name, {}), lora_scale)
        held[name] = {
            "attn": {"qkv": jnp.concatenate([_output_major(w["q"]), _output_major(w["k"]),
                                             _output_major(w["v"])]),
                     "o": w["o"].reshape(-1, config.embed_dim)},
            "mlp": {"gate_up": jnp.concatenate([_gate_output_major(config, w["gate"]),
                                                _gate_output_major(config, w["up"])]),
                    "down": w["down"].T},
        }
    return held


def _projections(config: ModelConfig, layer: dict, factors: dict, scale: float
                 ) -> dict[str, jax.Array]:
    """Each projection's weight in f32, as its row of lora.TARGETS slices it, with scale·A·B added
    where the layer has factors for it (what adapted_einsum.merged computes at every call)."""
    adapted = {name: f for module in factors.values() for name, f in module.items()}
    out = {}
    for name in TARGETS:
        row = target(name, config)
        w = layer[row.module]
        for key in row.weight.split("/"):
            w = w[key]
        w = w if row.index is None else w[row.index]
        if name in adapted:
            w = adapted_einsum.merged_weight(row.eqn, scale, w, adapted[name]["a"],
                                             adapted[name]["b"], jnp.float32)
        out[name] = w.astype(jnp.float32)
    return out


def _output_major(w: jax.Array) -> jax.Array:
    """[N, D, H] -> [N·H, D]."""
    n, d, h = w.shape
    return jnp.transpose(w, (0, 2, 1)).reshape(n * h, d)


def _gate_output_major(config: ModelConfig, w: jax.Array) -> jax.Array:
    """A gate or up weight, stored [F, D] (transposed gating) or [D, F] -> [F, D]."""
    return w if config.transpose_gating_einsum else w.T
