"""The scanned layout of the layers: per-layer trees <-> one stacked tree per attention kind.

With `scan_layers` the model compiles one block per position of the attention pattern and runs
it over the groups (Gemma 2: (local, global) x 13 for the 2B; Gemma 3: 5 local + 1 global). A
layer's params then live stacked, like DeepMind's STACKED checkpoints:

    layer_{g * P + j}/<rest>  <->  stacked_layers/attention_type_{j}/<rest>[g]

for the G = num_layers // P whole groups; the layers after them (Gemma 3 1B's 26 = 4 x 6 + 2)
stay `layer_i`, unrolled. The same mapping stacks the LoRA factors and the KV cache. Files on
disk (adapters, PEFT, exports) always keep the per-layer layout: `unstack` before writing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.model.config import AttentionKind, ModelConfig

STACK = "stacked_layers"
_LAYER = re.compile(r"^layer_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    period: int  # P: layers of one repetition of the attention pattern
    groups: int  # G: repetitions scanned over

    @property
    def scanned(self) -> int:
        return self.period * self.groups


def pattern_period(kinds: tuple[AttentionKind, ...]) -> int:
    """The shortest P with kinds[i] == kinds[i % P] for every layer."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


def layout(config: ModelConfig) -> Layout:
    period = pattern_period(config.attention_kinds)
    return Layout(period, config.num_layers // period)


def slot_name(j: int) -> str:
    return f"attention_type_{j}"


def stacked_location(layer: int, config: ModelConfig) -> tuple[str, int] | None:
    """(stacked key, index in the stack) of `layer`, or None if it stays unrolled."""
    lay = layout(config)
    if layer >= lay.scanned:
        return None
    return f"{STACK}/{slot_name(layer % lay.period)}", layer // lay.period


def _stack_leaves(leaves: list):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack(tree: Mapping, config: ModelConfig) -> dict:
    """A tree with `layer_i` keys (params, LoRA factors, a KV cache) in the scanned layout."""
    lay = layout(config)
    out = {k: v for k, v in tree.items()
           if not ((m := _LAYER.match(k)) and int(m[1]) < lay.scanned)}
    if lay.groups == 0:
        return out
    slots = {}
    for j in range(lay.period):
        layers = [tree[f"layer_{g * lay.period + j}"] for g in range(lay.groups)]
        slots[slot_name(j)] = jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *layers)
    out[STACK] = slots
    return out


def unstack(tree: Mapping, config: ModelConfig) -> dict:
    """The inverse of `stack`: per-layer `layer_i` keys again (a tree not stacked is returned
    as it is)."""
    if STACK not in tree:
        return dict(tree)
    lay = layout(config)
    out = {k: v for k, v in tree.items() if k != STACK}
    for j in range(lay.period):
        slot = tree[STACK][slot_name(j)]
        for g in range(lay.groups):
            out[f"layer_{g * lay.period + j}"] = jax.tree.map(lambda x, g=g: x[g], slot)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(key: str) -> tuple[int, str]:
    m = _LAYER.match(key)
    return (int(m[1]), "") if m else (-1, key)


def is_stacked(tree: Mapping) -> bool:
    return STACK in tree
