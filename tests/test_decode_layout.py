"""The decode loop's held weights (model/decode_layout.py): the same logits as the official layout
with its LoRA factors, read from the held matrices alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig
from kaggle_pipeline.model import Transformer, decode_layout, init_cache, init_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.layers import DECODE
from kaggle_pipeline.model.lora import TARGETS, LoraConfig, init_lora, merge_lora, target

LORA = LoraConfig(rank=4, alpha=8.0, targets=tuple(TARGETS))  # every projection adapted

CASES = {
    # Gemma 2 with grouped kv heads (kv_einsum), with one qkv weight (qkv_einsum), Gemma 3
    # (QK norm, gating stored transposed).
    "gemma2-kv": dict(family="gemma2"),
    "gemma2-qkv": dict(family="gemma2", num_kv_heads=4),
    "gemma3": dict(family="gemma3"),
}


def _case(name):
    cfg = tiny_config(num_layers=2, sliding_window=4, **CASES[name])
    params = init_params(cfg, jax.random.key(0))
    lora = init_lora(cfg, LORA, jax.random.key(1))
    # B starts at zero: give it values, so a factor used wrongly changes the output.
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: (0.1 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
                         if path[-1].key == "b" else x), lora)
    return cfg, params, lora


def _prefill_and_step(model, prefill_variables, step_variables, tokens):
    """Logits of one decode step after a cached prefill of all but the last token."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = init_cache(model.config, b, t)
    _, cache = model.apply(prefill_variables, tokens[:, :-1], positions[:, :-1],
                           jnp.ones((b, t - 1), jnp.int32), cache, jnp.full((b,), t - 1))
    logits, _ = model.apply(step_variables, tokens[:, -1:], positions[:, -1:],
                            jnp.ones((b, 1), jnp.int32), cache)
    return logits[:, 0]


def _is_projection(cfg, path) -> bool:
    """A weight that some row of the LoRA target table projects with, in cfg's layout."""
    weights = {target(name, cfg).weight.split("/")[0] for name in TARGETS}
    return bool({getattr(p, "key", None) for p in path} & weights)


@pytest.mark.parametrize("name", sorted(CASES))
def test_held_weights_give_the_adapted_models_logits(name):
    cfg, params, lora = _case(name)
    model = Transformer(cfg, lora_scale=LORA.scale)
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
    adapted = {"params": params, "lora": lora}
    expected = _prefill_and_step(model, adapted, adapted, tokens)

    held = decode_layout.hold(cfg, adapted, LORA.scale)
    assert set(held) == {"layer_0", "layer_1"} and set(held["layer_0"]) == {"attn", "mlp"}
    # The modules read only the held matrices: with the official projection weights zeroed
    # they still give the adapted model's logits, in a decode step and in a prefill.
    zeroed = {"params": jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if _is_projection(cfg, path) else x, params),
        DECODE: held}
    np.testing.assert_allclose(_prefill_and_step(model, adapted, zeroed, tokens), expected,
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_prefill_and_step(model, zeroed, zeroed, tokens), expected,
                               atol=1e-5, rtol=1e-5)
    # And the zeroed weights alone are a different model: the comparison can fail.
    assert not np.allclose(_prefill_and_step(model, adapted, {"params": zeroed["params"]},
                                             tokens), expected, atol=1e-3)


def test_held_weights_apply_to_f32_per_layer_params_of_small_models_only(monkeypatch):
    cfg, params, _ = _case("gemma3")
    assert decode_layout.applies({"params": params}, jnp.float32)
    assert not decode_layout.applies({"params": params}, jnp.bfloat16)
    stacked = init_params(cfg, jax.random.key(0), scan_layers=True)
    assert not decode_layout.applies({"params": stacked}, jnp.float32)
    # A model whose held copy would pass the memory bound keeps its official weights.
    monkeypatch.setattr(decode_layout, "MAX_HELD_BYTES", 1000)
    assert not decode_layout.applies({"params": params}, jnp.float32)


def test_sampler_with_lora_decodes_like_the_merged_model():
    """Greedy generation with LoRA factors (held and merged inside the decode loop) gives the
    tokens of the merged model decoded step by step without a cache."""
    cfg, params, lora = _case("gemma3")
    model = Transformer(cfg, lora_scale=LORA.scale)
    sampler = Sampler(model, stop_ids=[1], pad_multiple=8)
    prompts = [[2, 5, 6, 7, 8, 9, 10], [2, 11, 12]]
    outputs = sampler.generate({"params": params, "lora": lora}, prompts,
                               SamplingConfig(max_new_tokens=10))
    merged = merge_lora(params, lora, cfg, LORA)
    plain = Transformer(cfg)
    apply = jax.jit(plain.apply)
    for prompt, out in zip(prompts, outputs, strict=True):
        seq = list(prompt)
        for _ in range(10):
            t = jnp.asarray([seq])
            logits, _ = apply({"params": merged}, t, jnp.arange(len(seq))[None],
                              jnp.ones_like(t))
            nxt = int(jnp.argmax(logits[0, -1]))
            if nxt == 1:
                break
            seq.append(nxt)
        assert out == seq[len(prompt):]
