"""Hand-written LoRA: factors for the attention (and optionally MLP) projections, and merging.

The factors form their own pytree, nested like the params (`layer_i/attn/q/{a,b}`), and are
passed to the model as the `lora` collection; the base params stay frozen and untouched.
Shapes per projection (D embed, N heads, K kv heads, H head dim, F MLP width, r rank):
  q: a [D,r] b [r,N,H]   k, v: a [D,r] b [r,K,H]   o: a [N,H,r] b [r,D]
  gate, up: a [D,r] b [r,F]   down: a [F,r] b [r,D]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kaggle_pipeline.config import ModelConfig

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self):
        unknown = set(self.targets) - set(ATTENTION_TARGETS + MLP_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; "
                             f"choose from {ATTENTION_TARGETS + MLP_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def factor_shapes(config: ModelConfig, target: str, rank: int) -> tuple[tuple, tuple]:
    d, n, k, h, f = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.hidden_dim)
    return {
        "q": ((d, rank), (rank, n, h)),
        "k": ((d, rank), (rank, k, h)),
        "v": ((d, rank), (rank, k, h)),
        "o": ((n, h, rank), (rank, d)),
        "gate": ((d, rank), (rank, f)),
        "up": ((d, rank), (rank, f)),
        "down": ((f, rank), (rank, d)),
    }[target]


def _module_of(target: str) -> str:
    return "attn" if target in ATTENTION_TARGETS else "mlp"


def init_lora(config: ModelConfig, lora: LoraConfig, rng: jax.Array,
              dtype: jnp.dtype = jnp.float32) -> dict:
    """A random, B = 0 so the adapted model starts exactly at the base model."""
    tree: dict = {}
    for i in range(config.num_layers):
        layer: dict = {}
        for target in lora.targets:
            rng, key = jax.random.split(rng)
            a_shape, b_shape = factor_shapes(config, target, lora.rank)
            fan_in = math.prod(a_shape[:-1])
            # Kaiming-uniform like PEFT's default, so the same lr behaves the same.
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
            layer.setdefault(_module_of(target), {})[target] = {"a": a,
                                                                "b": jnp.zeros(b_shape, dtype)}
        tree[f"layer_{i}"] = layer
    return tree


def delta_weights(factors: dict, target: str) -> jax.Array:
    """The dense update B·A of one projection, shaped like the projection's weight."""
    a, b = factors["a"], factors["b"]
    if target in ("q", "k", "v"):
        return jnp.einsum("Dr,rNH->NDH", a, b)  # like q_einsum [N,D,H]
    if target == "o":
        return jnp.einsum("NHr,rD->NHD", a, b)
    if target in ("gate", "up"):
        return jnp.einsum("Dr,rF->DF", a, b)
    return jnp.einsum("Fr,rD->FD", a, b)  # down, like linear [F,D]


def merge_lora(params: dict, lora_tree: dict, config: ModelConfig, lora: LoraConfig) -> dict:
    """Base params with scale·B·A folded in: the adapted model without the adapter."""
    merged = jax.tree.map(jnp.asarray, params)  # new containers; numpy leaves become arrays
    for layer_name, modules in lora_tree.items():
        layer = merged[layer_name]
        for module_name, targets in modules.items():
            for target, factors in targets.items():
                delta = lora.scale * delta_weights(factors, target)
                _add_delta(layer[module_name], target, delta, config)
    return merged


def _add_delta(module: dict, target: str, delta: jax.Array, config: ModelConfig) -> None:
    def add(w, d):
        return (w.astype(jnp.float32) + d).astype(w.dtype)

    if target == "o":
        module["attn_vec_einsum"]["w"] = add(module["attn_vec_einsum"]["w"], delta)
    elif target in ("q", "k", "v"):
        if config.use_qkv_einsum:
            index = "qkv".index(target)
            w = module["qkv_einsum"]["w"]
            module["qkv_einsum"]["w"] = w.at[index].set(add(w[index], delta))
        elif target == "q":
            module["q_einsum"]["w"] = add(module["q_einsum"]["w"], delta)
        else:
            w = module["kv_einsum"]["w"]
            index = "kv".index(target)
            module["kv_einsum"]["w"] = w.at[index].set(add(w[index], delta))
    elif target in ("gate", "up"):
        index = ("gate", "up").index(target)
        w = module["gating_einsum"]
        d = delta.T if config.transpose_gating_einsum else delta
        module["gating_einsum"] = w.at[index].set(add(w[index], d))
    else:
        module["linear"] = add(module["linear"], delta)


def count_params(tree: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
