"""LoRA: a fresh adapter is the base model, merging equals applying, and training touches
only the factors (optimizer state and gradients)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import (
    ATTENTION_TARGETS,
    MLP_TARGETS,
    LoraConfig,
    count_params,
    init_lora,
    merge_lora,
)
from kaggle_pipeline.model.loss import add_target_slots
from kaggle_pipeline.model.sharding import make_mesh
from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
from kaggle_pipeline.training.step import Trainer

ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
SEQ_LEN = 20


def _inputs(vocab_size: int, rows: int = 2):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab_size, (rows, SEQ_LEN)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), tokens.shape)
    segment_ids = np.ones_like(tokens)
    segment_ids[1, 15:] = 0  # a padded row too
    return tokens, positions, segment_ids


def _random_params(config, seed: int = 0) -> dict:
    """Random weights, norm scales included (numpy: jax's per-shape RNG compiles are slow)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32),
                        abstract_params(config))


@functools.cache
def _apply(config, lora_scale: float):
    return jax.jit(Transformer(config, lora_scale=lora_scale).apply)


def _logits(config, variables, lora_scale=1.0):
    tokens, positions, segment_ids = _inputs(config.vocab_size)
    logits, _ = _apply(config, lora_scale)(variables, tokens, positions, segment_ids)
    return np.asarray(logits)


def _randomized(tree, seed: int, std: float = 0.3):
    """Every factor random (B != 0), as after training."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), tree)


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("family,kv_heads,targets", [("gemma2", 2, ATTENTION_TARGETS),
                                                     ("gemma3", 4, ALL_TARGETS)],
                         ids=["gemma2-gqa-attn", "gemma3-qkv_einsum-attn+mlp"])
def test_fresh_adapter_is_exactly_the_base_model(family, kv_heads, targets):
    config = tiny_config(family, num_layers=2, sliding_window=6, num_kv_heads=kv_heads)
    params = _random_params(config)
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=targets)
    lora = init_lora(config, lora_config, jax.random.key(1))
    assert all(not np.any(f["b"]) for layer in lora.values() for module in layer.values()
               for f in module.values())

    base = _logits(config, {"params": params})
    adapted = _logits(config, {"params": params, "lora": lora}, lora_config.scale)
    np.testing.assert_array_equal(adapted, base)
    # The same tree with B != 0 does change the output: the adapter path is live.
    trained = _logits(config, {"params": params, "lora": _randomized(lora, 2)}, lora_config.scale)
    assert _rel_err(trained, base) > 1e-2


@pytest.mark.parametrize("family,kv_heads", [("gemma2", 2), ("gemma2", 4), ("gemma3", 2),
                                             ("gemma3", 4)],
                         ids=["gemma2-gqa", "gemma2-qkv_einsum", "gemma3-gqa",
                              "gemma3-qkv_einsum"])
def test_merged_weights_equal_the_applied_adapter(family, kv_heads):
    # Gemma 2 tiny keeps gating as (2, D, F), Gemma 3 as (2, F, D): both merge paths run.
    config = tiny_config(family, num_layers=2, sliding_window=6, num_kv_heads=kv_heads)
    assert config.use_qkv_einsum == (kv_heads == config.num_heads)
    params = _random_params(config)
    lora_config = LoraConfig(rank=4, alpha=16.0, targets=ALL_TARGETS)
    lora = _randomized(init_lora(config, lora_config, jax.random.key(1)), 3, std=0.2)

    adapted = _logits(config, {"params": params, "lora": lora}, lora_config.scale)
    merged = merge_lora(params, lora, config, lora_config)
    assert _rel_err(adapted, _logits(config, {"params": params})) > 1e-2
    assert _rel_err(_logits(config, {"params": merged}), adapted) <= 1e-5
    # merge_lora builds new containers: the base tree is left as it was.
    jax.tree.map(np.testing.assert_array_equal, params, _random_params(config))


def _trainer(config, mode: str) -> Trainer:
    mesh = make_mesh(devices=jax.devices()[:1])
    return Trainer(Transformer(config, lora_scale=2.0), make_optimizer(OptimConfig(), 10), mesh,
                   mode)


def _float_shapes(tree) -> list[tuple[int, ...]]:
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree)
                  if jnp.issubdtype(x.dtype, jnp.floating))


def test_optimizer_state_holds_only_lora_sized_moments():
    config = tiny_config("gemma2", num_layers=2)
    params = _random_params(config)
    lora = init_lora(config, LoraConfig(rank=4, targets=ALL_TARGETS), jax.random.key(1))

    opt_state = _trainer(config, "lora").init_state(lora)["opt_state"]
    floats = sum(int(x.size) for x in jax.tree.leaves(opt_state)
                 if jnp.issubdtype(x.dtype, jnp.floating))
    assert floats == 2 * count_params(lora)  # Adam's two moments
    assert _float_shapes(opt_state) == sorted(_float_shapes(lora) * 2)
    others = [x for x in jax.tree.leaves(opt_state) if not jnp.issubdtype(x.dtype, jnp.floating)]
    assert others and all(x.shape == () for x in others)  # step counts only
    assert count_params(lora) < count_params(params) / 5

    # The same count in full mode sees every base param: the measure does tell them apart.
    full_state = _trainer(config, "full").init_state(params)["opt_state"]
    assert _float_shapes(full_state) == sorted(_float_shapes(params) * 2)


def _dot_output_shapes(jaxpr, min_contracted: int = 1) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, nested calls (jit, remat, ...) included,
    that contracts more than `min_contracted` elements per output."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            if math.prod(lhs_shape[d] for d in lhs_contracting) > min_contracted:
                shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner, min_contracted)
    return shapes


def test_step_computes_no_gradient_for_the_base_weights():
    """A weight gradient is a matmul that contracts batch and time away, leaving exactly the
    weight's dimensions; activations always keep batch (3) and time (20 / 8 target slots)."""
    config = tiny_config("gemma2", num_layers=2, vocab_size=128)  # D 32, F 64, N 4, K 2, H 16
    params = _random_params(config)
    lora = init_lora(config, LoraConfig(rank=4, targets=ALL_TARGETS), jax.random.key(1))
    tokens, positions, segment_ids = _inputs(config.vocab_size, rows=3)
    targets = segment_ids.astype(bool)
    targets[:, :12] = False
    batch = add_target_slots({"tokens": tokens, "positions": positions,
                              "segment_ids": segment_ids, "targets": targets}, 8)

    # Stacked weights are used (and differentiated) one slice at a time: gate and up, k and v.
    stacked = {"gating_einsum", "kv_einsum", "qkv_einsum"}
    matrices = [x[0] if {getattr(p, "key", None) for p in path} & stacked else x
                for path, x in jax.tree_util.tree_leaves_with_path(params) if x.ndim > 1]
    base_shapes = {tuple(sorted(x.shape)) for x in matrices}
    lora_shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(lora)}
    assert not base_shapes & lora_shapes

    def weight_grads(mode, trainable, frozen):
        trainer = _trainer(config, mode)
        state = trainer.init_state(trainable)
        step = trainer.compile_step(state, frozen)
        jaxpr = jax.make_jaxpr(step)(state, frozen, trainer.put_batch(batch))
        # The merged LoRA forms W + s·AB, weight-shaped but contracting only the rank (4).
        shapes = _dot_output_shapes(jaxpr.jaxpr, min_contracted=4)
        return {tuple(sorted(s)) for s in shapes}

    lora_step = weight_grads("lora", lora, params)
    assert not lora_step & base_shapes
    assert lora_step >= lora_shapes  # the factors' own gradients are there
    # Positive control: fine-tuning everything does produce base-shaped weight gradients.
    assert weight_grads("full", params, {}) >= base_shapes
