"""Hand-written LoRA: one table of the projections it can adapt, factors, merging.

`TARGETS` is the only place that knows a projection: which module computes it, the einsum it is
(`attention.py` and `feed_forward.py` use these equations), where its frozen weight sits in the
official layout, and its Hugging Face module name. Factor shapes, initialisation, merging, PEFT
export and the adapter files all follow from a row, so a new target is one row.

The factors form their own pytree, nested like the params (`layer_i/attn/q/{a,b}`), and are
passed to the model as the `lora` collection; the base params stay frozen and untouched. The
factor subscripts follow from the einsum (`adapted_einsum.subscripts`): A maps the contracted
dimensions to the rank r, B maps r to the output dimensions. Shapes (D embed, N heads, K kv
heads, H head dim, F MLP width):
  q: a [D,r] b [r,N,H]   k, v: a [D,r] b [r,K,H]   o: a [N,H,r] b [r,D]
  gate, up: a [D,r] b [r,F]   down: a [F,r] b [r,D]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kaggle_pipeline.model import adapted_einsum
from kaggle_pipeline.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # the key of its factors: layer_i/<module>/<name>/{a,b}
    module: str  # the module computing it: "attn" or "mlp"
    eqn: str  # the projection as an einsum, on the weight as the official layout stores it
    weight: str  # that weight's path inside the module
    index: int | None  # its slice of a stacked weight (kv, qkv, gate/up), or None
    hf_module: str  # the Hugging Face / PEFT module inside a decoder layer

    def dimension_sizes(self, config: ModelConfig, rank: int) -> dict[str, int]:
        return {"B": 1, "T": 1, "D": config.embed_dim, "N": config.num_heads,
                "K": config.num_kv_heads, "H": config.head_dim, "F": config.hidden_dim,
                adapted_einsum.RANK: rank}

    def factor_shapes(self, config: ModelConfig, rank: int) -> tuple[tuple, tuple]:
        sizes = self.dimension_sizes(config, rank)
        s = adapted_einsum.subscripts(self.eqn)
        return tuple(sizes[c] for c in s.a), tuple(sizes[c] for c in s.b)


def _targets(config: ModelConfig | None = None) -> dict[str, Target]:
    """The rows; the stored layout of q/k/v and gate/up depends on the model's config."""
    fused = config is not None and config.use_qkv_einsum  # no GQA: one qkv weight
    gating_t = config is not None and config.transpose_gating_einsum  # gating stored (2, F, D)
    kv_eqn = "BTD,NDH->BTNH" if fused else "BTD,KDH->BTKH"
    gate_eqn = "BTD,FD->BTF" if gating_t else "BTD,DF->BTF"
    rows = [
        Target("q", "attn", "BTD,NDH->BTNH", "qkv_einsum/w" if fused else "q_einsum/w",
               0 if fused else None, "self_attn.q_proj"),
        Target("k", "attn", kv_eqn, "qkv_einsum/w" if fused else "kv_einsum/w",
               1 if fused else 0, "self_attn.k_proj"),
        Target("v", "attn", kv_eqn, "qkv_einsum/w" if fused else "kv_einsum/w",
               2 if fused else 1, "self_attn.v_proj"),
        Target("o", "attn", "BTNH,NHD->BTD", "attn_vec_einsum/w", None, "self_attn.o_proj"),
        Target("gate", "mlp", gate_eqn, "gating_einsum", 0, "mlp.gate_proj"),
        Target("up", "mlp", gate_eqn, "gating_einsum", 1, "mlp.up_proj"),
        Target("down", "mlp", "BTF,FD->BTD", "linear", None, "mlp.down_proj"),
    ]
    return {t.name: t for t in rows}


TARGETS = _targets()
ATTENTION_TARGETS = tuple(t.name for t in TARGETS.values() if t.module == "attn")
MLP_TARGETS = tuple(t.name for t in TARGETS.values() if t.module == "mlp")


def target(name: str, config: ModelConfig | None = None) -> Target:
    """The row of `name`, with the equation and weight of `config`'s layout."""
    return _targets(config)[name]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning of every parameter instead
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    # Adapt only the last N decoder layers (0, or N at least the model's depth: every layer).
    # The layers below take no gradient: the backward pass stops at the first adapted layer
    # (PEFT's layers_to_transform).
    last_layers: int = 0

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from "
                             f"{tuple(TARGETS)}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if self.last_layers < 0:
            raise ValueError(f"LoRA last_layers must be 0 (every layer) or more, got "
                             f"{self.last_layers}")

    def layers(self, num_layers: int) -> range:
        """The indices of the adapted layers of a `num_layers`-layer model."""
        if self.last_layers == 0:
            return range(num_layers)
        return range(max(0, num_layers - self.last_layers), num_layers)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def factor_shapes(config: ModelConfig, target_name: str, rank: int) -> tuple[tuple, tuple]:
    return TARGETS[target_name].factor_shapes(config, rank)


def init_lora(config: ModelConfig, lora: LoraConfig, rng: jax.Array,
              dtype: jnp.dtype = jnp.float32) -> dict:
    """A random, B = 0 so the adapted model starts exactly at the base model."""
    tree: dict = {}
    for i in lora.layers(config.num_layers):
        layer: dict = {}
        for name in lora.targets:
            rng, key = jax.random.split(rng)
            a_shape, b_shape = factor_shapes(config, name, lora.rank)
            fan_in = math.prod(a_shape[:-1])
            # Kaiming-uniform like PEFT's default, so the same lr behaves the same.
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
            layer.setdefault(TARGETS[name].module, {})[name] = {"a": a,
                                                                "b": jnp.zeros(b_shape, dtype)}
        tree[f"layer_{i}"] = layer
    return tree


def delta_weight(config: ModelConfig, target_name: str, factors: dict) -> jax.Array:
    """The dense update A·B of one projection, shaped like its slice of the stored weight."""
    s = adapted_einsum.subscripts(target(target_name, config).eqn)
    return jnp.einsum(s.merge, factors["a"], factors["b"])


def merge_lora(params: dict, lora_tree: dict, config: ModelConfig, lora: LoraConfig) -> dict:
    """Base params with scale·A·B folded in: the adapted model without the adapter."""
    merged = jax.tree.map(jnp.asarray, params)  # new containers; numpy leaves become arrays
    for layer_name, modules in lora_tree.items():
        for module_name, targets in modules.items():
            module = merged[layer_name][module_name]
            for name, factors in targets.items():
                row = target(name, config)
                delta = lora.scale * delta_weight(config, name, factors)
                *parents, leaf = row.weight.split("/")
                holder = module
                for key in parents:
                    holder = holder[key]
                w = holder[leaf]
                if row.index is None:
                    holder[leaf] = _add(w, delta)
                else:
                    holder[leaf] = w.at[row.index].set(_add(w[row.index], delta))
    return merged


def _add(w: jax.Array, delta: jax.Array) -> jax.Array:
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def count_params(tree: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
