"""LoRA on the last layers only (`lora.last_layers`), and the frozen layers below computed once
(training/frozen_prefix.py): the model started from their stored output gives the outputs and
LoRA gradients of a full pass; the factors exist for the adapted layers only; a training step
from the stored streams equals one from the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lora_with_values, packed_layout

from kaggle_pipeline.data.packing import batches, pack
from kaggle_pipeline.model import Transformer, init_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import LoraConfig, init_lora
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row
from kaggle_pipeline.model.sharding import make_mesh
from kaggle_pipeline.training import frozen_prefix
from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
from kaggle_pipeline.training.step import Trainer

T = 24
LORA = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"),
                  last_layers=2)


def _inputs(config):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (2, T)))
    segments, positions = packed_layout([(7, 9, 3), (12, 10)], T)
    return tokens, jnp.asarray(positions), jnp.asarray(segments)


def test_only_the_last_layers_get_factors():
    config = tiny_config("gemma3", num_layers=4)
    assert sorted(init_lora(config, LORA, jax.random.key(0))) == ["layer_2", "layer_3"]
    assert list(LORA.layers(4)) == [2, 3]
    assert list(LoraConfig().layers(4)) == [0, 1, 2, 3]
    assert list(LoraConfig(last_layers=9).layers(4)) == [0, 1, 2, 3]  # more than there are
    with pytest.raises(ValueError, match=r"last_layers must be 0 \(every layer\) or more"):
        LoraConfig(last_layers=-1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_starting_from_the_stored_stream_equals_a_full_pass(family):
    config = tiny_config(family, num_layers=4, sliding_window=5)
    params, lora = init_params(config, jax.random.key(0)), lora_with_values(config, LORA)
    model = Transformer(config, lora_scale=2.0)
    tokens, positions, segments = _inputs(config)

    def hidden(lora, start):
        variables = {"params": params, "lora": lora}
        if not start:
            return model.apply(variables, tokens, positions, segments, return_hidden=True)[0]
        stream = model.apply({"params": params}, tokens, positions, segments, stop_before=2)
        return model.apply(variables, tokens, positions, segments, return_hidden=True,
                           stream=stream, first_layer=2)[0]

    def loss(lora, start):
        h = hidden(lora, start)
        return jnp.sum(h * jnp.cos(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape))

    full, started = hidden(lora, False), hidden(lora, True)
    np.testing.assert_allclose(started, full, rtol=1e-5, atol=1e-5)
    full_grads = jax.grad(loss)(lora, False)
    started_grads = jax.grad(loss)(lora, True)
    for a, b in zip(jax.tree.leaves(started_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The comparison can fail: the stream entering layer 1 is not the one entering layer 2.
    early = model.apply({"params": params}, tokens, positions, segments, stop_before=1)
    wrong = model.apply({"params": params, "lora": lora}, tokens, positions, segments,
                        return_hidden=True, stream=early, first_layer=2)[0]
    assert not np.allclose(wrong, full, atol=1e-3)


def test_a_step_from_stored_streams_equals_a_step_from_tokens():
    """Trainer.first_layer with frozen_prefix.row_streams: the same losses and factors after
    three steps as the step that runs every layer."""
    config = tiny_config("gemma3", num_layers=4, sliding_window=5)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    examples = [(rng.integers(3, config.vocab_size, n), np.arange(n) >= n // 2)
                for n in rng.integers(4, 20, 24)]
    rows, _ = pack(examples, 32)
    mesh = make_mesh(devices=jax.devices()[:1])
    model = Transformer(config, lora_scale=LORA.scale)
    first = frozen_prefix.first_layer(LORA, config)
    assert first == 2
    streams = frozen_prefix.row_streams(frozen_prefix.below_fn(model, first), params, rows, 4,
                                        mesh)
    assert streams.shape == (len(rows), 32, config.embed_dim)
    results = []
    for layer, row_set in ((0, rows), (first, [{**r, "stream": s}
                                               for r, s in zip(rows, streams, strict=True)])):
        trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=0.05), 3), mesh,
                          "lora", first_layer=layer)
        state = trainer.init_state(init_lora(config, LORA, jax.random.key(1)))
        step = trainer.compile_step(state, params)
        losses = []
        for batch in list(batches(row_set, 4, seed=0, epoch=0))[:3]:
            state, m = step(state, params, trainer.put_batch(
                add_target_slots(batch, max_targets_per_row(rows))))
            losses.append(float(m["loss"]))
        results.append((losses, jax.device_get(state["trainable"])))
    (full_losses, full), (stored_losses, stored) = results
    np.testing.assert_allclose(stored_losses, full_losses, rtol=1e-5)
    assert len(set(full_losses)) == 3
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(full["layer_2"]["attn"]["q"]["b"], 0.0)  # the steps trained


def test_it_applies_only_where_the_layers_below_are_frozen_and_unrolled():
    config = tiny_config("gemma3", num_layers=4)
    assert frozen_prefix.first_layer(LoraConfig(), config) == 0  # every layer adapted
    assert frozen_prefix.first_layer(LoraConfig(last_layers=4), config) == 0
    assert frozen_prefix.first_layer(LORA, config, scan_layers=True) == 0
    assert frozen_prefix.first_layer(LoraConfig(enabled=False, last_layers=2), config) == 0
    with pytest.raises(ValueError, match="need unrolled layers"):
        Transformer(config, scan_layers=True).init(
            jax.random.key(0), *_inputs(config), stop_before=1)


def test_the_main_job_adapts_the_last_9_layers_and_older_runs_still_match():
    """The main job's default is 9 of 18; a run that adapts every layer records no
    lora.last_layers in its identity, as runs saved before the key existed did not."""
    from kaggle_pipeline import run_setup
    from kaggle_pipeline.run_config import load_config

    main_job = load_config(None)
    assert main_job.lora.last_layers == 9
    every = load_config(None, ["lora.last_layers=0"])
    spec = run_setup.task_spec(every)
    assert "lora.last_layers" not in run_setup.run_identity(every, spec)["settings"]
    assert run_setup.run_identity(main_job, spec)["settings"]["lora.last_layers"] == 9
