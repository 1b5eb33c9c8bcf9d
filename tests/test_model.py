"""The model's own invariants: cached decoding, packing isolation, the sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.inference.sampler import (
    Sampler,
    SamplingConfig,
    argmax_vocab_major,
    sample_token,
)
from kaggle_pipeline.model import Transformer, abstract_params, init_cache, init_params
from kaggle_pipeline.model.config import PRESETS, tiny_config

REFERENCE_LENGTH = 32  # reference sequences are padded to this: one compilation per model


@functools.lru_cache(maxsize=8)
def _jitted_apply(model):
    return jax.jit(model.apply)


def _forward(model, params, tokens):
    """Logits of `tokens` alone, from a padded row (padding is segment 0: causal attention keeps
    it out of the real positions), so every length shares one compiled program."""
    n = len(tokens)
    assert n <= REFERENCE_LENGTH
    t = jnp.asarray([list(tokens) + [0] * (REFERENCE_LENGTH - n)])
    segments = jnp.asarray([[1] * n + [0] * (REFERENCE_LENGTH - n)])
    logits, _ = _jitted_apply(model)({"params": params}, t, jnp.arange(REFERENCE_LENGTH)[None],
                                     segments)
    return logits[0, :n]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_cached_decode_equals_full_forward_past_the_window(family):
    cfg = tiny_config(family, num_layers=6, sliding_window=4)
    params = init_params(cfg, jax.random.key(0))
    model = Transformer(cfg)
    total, prompt = 14, 5
    tokens = jax.random.randint(jax.random.key(1), (2, total), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(total), (2, total))
    apply = _jitted_apply(model)
    full, _ = apply({"params": params}, tokens, positions, jnp.ones_like(tokens))

    cache = init_cache(cfg, 2, total)
    # Local layers keep only their window: the cache is smaller than the sequence.
    assert cache["layer_0"]["k"].shape[1] == 4 and cache[f"layer_{5}"]["k"].shape[1] == total
    first, cache = apply({"params": params}, tokens[:, :prompt], positions[:, :prompt],
                         jnp.ones((2, prompt), jnp.int32), cache, jnp.array([prompt] * 2))
    np.testing.assert_allclose(first, full[:, :prompt], atol=1e-5)
    for t in range(prompt, total):  # every step the same shapes: one compilation
        step, cache = apply({"params": params}, tokens[:, t:t + 1], positions[:, t:t + 1],
                             jnp.ones((2, 1), jnp.int32), cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_packed_examples_do_not_see_each_other():
    cfg = tiny_config("gemma2", num_layers=2, sliding_window=3)
    params = init_params(cfg, jax.random.key(0))
    model = Transformer(cfg)
    a, b = [2, 10, 11, 12, 13], [2, 20, 21]
    packed = jnp.asarray([a + b + [0, 0]])
    positions = jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]])
    segments = jnp.asarray([[1] * 5 + [2] * 3 + [0, 0]])
    logits, _ = _jitted_apply(model)({"params": params}, packed, positions, segments)
    np.testing.assert_allclose(logits[0, :5], _forward(model, params, a), atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:8], _forward(model, params, b), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sampler_greedy_matches_full_forward_loop(family):
    cfg = tiny_config(family, num_layers=6, sliding_window=4)
    params = init_params(cfg, jax.random.key(3))
    model = Transformer(cfg)
    sampler = Sampler(model, stop_ids=[1], pad_multiple=8)
    prompts = [[2, 5, 6, 7, 8, 9, 10], [2, 11, 12]]
    outputs = sampler.generate({"params": params}, prompts, SamplingConfig(max_new_tokens=12))
    for prompt, out in zip(prompts, outputs, strict=True):
        seq = list(prompt)
        for _ in range(12):
            nxt = int(jnp.argmax(_forward(model, params, seq)[-1]))
            if nxt == 1:
                break
            seq.append(nxt)
        assert out == seq[len(prompt):]


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda cfg: {int(sample_token(logits, k, cfg)[0]) for k in keys}  # noqa: E731
    assert draw(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
    assert draw(SamplingConfig(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draw(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}
    assert draw(SamplingConfig(temperature=0.0)) == {0}


@pytest.mark.parametrize("vocab", [262_144, 256_128, 1000])
def test_blocked_argmax_equals_argmax_with_its_tie_breaking(vocab):
    # Gemma 3's vocabulary splits into blocks of 512, Gemma 2's into blocks of 128, 1000 of 8.
    rng = np.random.default_rng(vocab)
    logits = rng.integers(-50, 50, (vocab, 6)).astype(np.float32)  # many ties
    logits[[3, vocab - 1], 0] = 60.0  # the same maximum in the first and the last block
    logits[[vocab - 1, vocab // 2], 1] = 60.0
    got = np.asarray(argmax_vocab_major(jnp.asarray(logits)))
    assert got.tolist() == np.argmax(logits, axis=0).tolist()
    assert got[0] == 3 and got[1] == vocab // 2


@pytest.mark.parametrize("name,billions", [("gemma2-2b", 2.61), ("gemma2-9b", 9.24),
                                           ("gemma2-27b", 27.2), ("gemma3-270m", 0.268),
                                           ("gemma3-1b", 1.0), ("gemma3-4b", 3.88)])
def test_presets_have_the_published_sizes(name, billions):
    cfg = PRESETS[name]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
    assert n == cfg.num_params()
    assert abs(n / 1e9 - billions) / billions < 0.03
