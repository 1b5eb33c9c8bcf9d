"""Layers as a scan (model.scan_layers) compute what the unrolled layers compute: logits, the
LoRA and the full gradients, cached decoding; the stacked layout round-trips to the per-layer
one that files keep."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.data.packing import pack
from kaggle_pipeline.model import Transformer, abstract_params, init_cache, init_params, layer_stack
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig, init_lora
from kaggle_pipeline.model.loss import add_target_slots, sequence_loss

# Gemma 2: 4 layers = 2 x (local, global). Gemma 3: 8 layers = 1 x (5 local + 1 global) + 2
# unrolled after the scan.
CONFIGS = {"gemma2": tiny_config("gemma2", num_layers=4, sliding_window=4),
           "gemma3": tiny_config("gemma3", num_layers=8, sliding_window=4)}
LORA = LoraConfig(rank=4, alpha=8.0, targets=ATTENTION_TARGETS + MLP_TARGETS)


def _case(family: str):
    config = CONFIGS[family]
    params = init_params(config, jax.random.key(0))
    # B != 0 (trained factors), so every factor has a gradient.
    lora = jax.tree.map(lambda x: x + 0.02, init_lora(config, LORA, jax.random.key(1)))
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(8):
        n = int(rng.integers(4, 14))
        examples.append((rng.integers(1, config.vocab_size, n), np.arange(n) >= n // 2))
    rows, _ = pack(examples, 24)
    batch = {k: np.stack([r[k] for r in rows[:3]]) for k in rows[0]}
    batch = add_target_slots(batch, 24)
    return config, params, lora, {k: jnp.asarray(v) for k, v in batch.items()}


def _loss(config, scan, remat=False):
    model = Transformer(config, lora_scale=LORA.scale, scan_layers=scan, remat=remat)

    def loss(params, lora, batch):
        total, count = sequence_loss(model, {"params": params, "lora": lora}, batch)
        return total / count

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))))


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_scan_equals_unrolled_values_and_gradients(family):
    config, params, lora, batch = _case(family)
    value, (grad_params, grad_lora) = _loss(config, False)(params, lora, batch)
    stacked = (layer_stack.stack(params, config), layer_stack.stack(lora, config))
    for remat in (False, True):
        s_value, (s_grad_params, s_grad_lora) = _loss(config, True, remat)(*stacked, batch)
        assert abs(float(s_value) - float(value)) <= 1e-5
        # f32 rounding of sums taken in another order: within 1e-5 of the gradient's norm.
        for scanned, unrolled in ((s_grad_params, grad_params), (s_grad_lora, grad_lora)):
            diff = _max_diff(layer_stack.unstack(scanned, config), unrolled)
            assert diff <= 1e-5 * _norm(unrolled)
    assert _norm(grad_lora) > 1e-2  # the gradients compared are not all zero


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_scanned_params_are_stacked_by_attention_kind(family):
    config = CONFIGS[family]
    shapes = abstract_params(config, scan_layers=True)
    lay = layer_stack.layout(config)
    assert set(shapes[layer_stack.STACK]) == {f"attention_type_{j}" for j in range(lay.period)}
    q = shapes[layer_stack.STACK]["attention_type_0"]["attn"]["q_einsum"]["w"]
    assert q.shape == (lay.groups, config.num_heads, config.embed_dim, config.head_dim)
    unrolled = sorted(k for k in shapes if k.startswith("layer_"))
    assert unrolled == [f"layer_{i}" for i in range(lay.scanned, config.num_layers)]
    # The layout functions agree with what the model declares.
    per_layer = abstract_params(config)
    restacked = jax.eval_shape(functools.partial(layer_stack.stack, config=config), per_layer)
    assert jax.tree.map(lambda x: x.shape, restacked) == jax.tree.map(lambda x: x.shape, shapes)


def test_stack_unstack_round_trip():
    config = CONFIGS["gemma3"]
    lora = init_lora(config, LORA, jax.random.key(2))
    back = layer_stack.unstack(layer_stack.stack(lora, config), config)
    assert list(back) == list(lora)  # layer order kept, for files written from it
    assert _max_diff(back, lora) == 0.0


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_scanned_cached_decoding_equals_the_unrolled_model(family):
    config = CONFIGS[family]
    params = init_params(config, jax.random.key(0))
    stacked = layer_stack.stack(params, config)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    outs = []
    for scan, p in ((False, params), (True, stacked)):
        model = Transformer(config, scan_layers=scan)
        cache = init_cache(config, 2, 9)
        first, cache = model.apply({"params": p}, tokens[:, :6], positions[:, :6],
                                   jnp.ones((2, 6), jnp.int32), cache, jnp.array([6, 6]))
        steps = [first]
        for t in range(6, 9):
            logits, cache = model.apply({"params": p}, tokens[:, t:t + 1], positions[:, t:t + 1],
                                        jnp.ones((2, 1), jnp.int32), cache)
            steps.append(logits)
        outs.append(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
