"""`read_at`: a forward pass that only wants a few positions' outputs (the loss, label scoring)
runs the last layer's queries, output projection and MLP at those positions alone. Same values
and the same LoRA gradients as computing every position and gathering; less work; the layouts
where it cannot apply (scanned layers, too many positions) fall back to gathering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lora_with_values, packed_layout

from kaggle_pipeline.model import Transformer, init_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.layer_stack import stack
from kaggle_pipeline.model.lora import LoraConfig

T = 24


def _batch(config):
    """Two packed rows, then padding; read positions scattered over the examples, with a
    repeat (a padded loss slot reads position 0 again)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (2, T))
    segments, positions = packed_layout([(7, 9, 3), (12, 10)], T)
    read_at = np.array([[6, 15, 18, 0, 0], [11, 21, 3, 20, 0]], np.int32)
    return tuple(jnp.asarray(a) for a in (tokens, positions, segments, read_at))


def _variables(config, scan_layers=False):
    params = init_params(config, jax.random.key(0))
    lora = lora_with_values(config, LoraConfig(rank=4, alpha=8, targets=(
        "q", "k", "v", "o", "gate", "up", "down")))
    if scan_layers:
        params, lora = stack(params, config), stack(lora, config)
    return params, lora


@functools.partial(jax.jit, static_argnums=(0, 1))
def _read(model, early, params, lora, tokens, positions, segments, read_at):
    """Hidden states at read_at and the gradient of a function of them w.r.t. the LoRA
    factors: through `read_at` (early) or gathered from every position."""
    def f(lora):
        variables = {"params": params, "lora": lora}
        if early:
            hidden, _ = model.apply(variables, tokens, positions, segments, return_hidden=True,
                                    read_at=read_at)
        else:
            full, _ = model.apply(variables, tokens, positions, segments, return_hidden=True)
            hidden = jnp.take_along_axis(full, read_at[..., None], axis=1)
        weights = jnp.cos(jnp.arange(hidden.size, dtype=jnp.float32)).reshape(hidden.shape)
        return jnp.sum(hidden * weights), hidden
    return jax.grad(f, has_aux=True)(lora)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_reading_a_few_positions_equals_gathering_them(family):
    config = tiny_config(family, num_layers=3, sliding_window=5)
    params, lora = _variables(config)
    model = Transformer(config, lora_scale=2.0)
    batch = _batch(config)
    early_grads, early = _read(model, True, params, lora, *batch)
    full_grads, full = _read(model, False, params, lora, *batch)
    assert early.shape == (2, 5, config.embed_dim)
    np.testing.assert_allclose(early, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(early_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # gradients up to ~70
    # The comparison can fail: another position's output differs.
    _, shifted = _read(model, True, params, lora, *batch[:3], batch[3].at[0, 0].set(5))
    assert not np.allclose(shifted[0, 0], full[0, 0], atol=1e-3)


def test_the_last_layer_runs_at_the_read_positions_only():
    """Fewer FLOPs than computing every position and gathering (XLA's own count)."""
    config = tiny_config("gemma3", num_layers=2, sliding_window=5)
    params, lora = _variables(config)
    model = Transformer(config, lora_scale=2.0)
    batch = _batch(config)
    flops = {early: _read.lower(model, early, params, lora, *batch).compile()
             .cost_analysis()["flops"] for early in (True, False)}
    assert flops[True] < 0.9 * flops[False], flops


@pytest.mark.parametrize("case", ["scanned", "many positions"])
def test_where_it_cannot_apply_it_gathers(case):
    scan = case == "scanned"
    # Gemma 2's pattern repeats every 2 layers: 2 layers are one scanned group, none unrolled.
    config = tiny_config("gemma2", num_layers=2 if scan else 3, sliding_window=5)
    params, lora = _variables(config, scan_layers=scan)
    model = Transformer(config, lora_scale=2.0, scan_layers=scan)
    tokens, positions, segments, read_at = _batch(config)
    if case == "many positions":  # more than half the sequence
        read_at = jnp.broadcast_to(jnp.arange(T - 2), (2, T - 2))
    early_grads, early = _read(model, True, params, lora, tokens, positions, segments, read_at)
    full_grads, full = _read(model, False, params, lora, tokens, positions, segments, read_at)
    np.testing.assert_allclose(early, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(early_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # gradients up to ~70
