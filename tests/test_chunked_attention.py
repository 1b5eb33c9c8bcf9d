"""Attention in query chunks (model.attention_chunk) equals dense attention: packed segments,
sliding windows and Gemma 2's soft-capping kept, a length that is no multiple of the chunk,
values and gradients. The loss unembedded chunk by chunk equals the loss in one piece."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_layout

from kaggle_pipeline.model import Transformer, attend, init_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.transformer import causal_segment_mask


def _packed(config, t: int):
    """Two rows: several packed examples, then padding (segment 0)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (2, t))
    segments, positions = packed_layout([(7, 9, 3), (12, 5)], t)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chunked_attention_equals_dense(family):
    config = tiny_config(family, num_layers=6, sliding_window=4)
    params = init_params(config, jax.random.key(0))
    tokens, positions, segments = _packed(config, 22)  # 22: no multiple of the chunk

    def loss_and_logits(params, chunk):
        model = Transformer(config, attention_chunk=chunk)
        logits, _ = model.apply({"params": params}, tokens, positions, segments)
        real = (segments > 0)[..., None]
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)[..., 1]), logits

    grad = jax.jit(jax.grad(loss_and_logits, has_aux=True), static_argnums=1)
    dense_grad, dense_logits = grad(params, 0)
    chunk_grad, chunk_logits = grad(params, 8)
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(chunk_logits[real], dense_logits[real], atol=1e-5)
    for a, b in zip(jax.tree.leaves(chunk_grad), jax.tree.leaves(dense_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_core_equals_dense_core_with_soft_capping():
    rng = np.random.default_rng(1)
    b, t, k, g, h = 2, 13, 2, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, k, g, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    segments = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 2, [1] * 13], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(5)) + [0, 0], list(range(13))])
    window = 3
    mask = causal_segment_mask(segments)
    qp, kp = positions[:, :, None], positions[:, None, :]
    mask = mask & (kp > qp - window) & (kp < qp + window)
    dense = attend.dense(q, kk, v, mask, softcap=2.0, dtype=jnp.float32)
    chunked = attend.chunked(q, kk, v, positions, segments, chunk=4, window=window,
                             softcap=2.0, dtype=jnp.float32)
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(chunked[real], dense[real], atol=1e-5)
    # The soft-cap is in effect: without it the result differs.
    uncapped = attend.dense(q, kk, v, mask, softcap=None, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(uncapped - dense)[real])) > 1e-3


def test_the_loss_in_chunks_equals_the_loss_in_one_piece():
    from kaggle_pipeline.model.loss import target_logprobs

    config = tiny_config("gemma2", num_layers=2, sliding_window=4)
    params = init_params(config, jax.random.key(0))
    tokens, positions, segments = _packed(config, 22)
    src = jnp.broadcast_to(jnp.arange(21), (2, 21))  # every position predicts the next
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_src": src}
    model = Transformer(config)

    def total(params, chunk):
        return jnp.sum(target_logprobs(model, {"params": params}, batch, chunk=chunk))

    grad = jax.jit(jax.value_and_grad(total), static_argnums=1)
    whole, whole_grad = grad(params, 64)
    chunked, chunked_grad = grad(params, 4)  # 6 chunks, the last one padded
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(whole_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    per_slot = target_logprobs(model, {"params": params}, batch, chunk=4)
    np.testing.assert_allclose(per_slot, target_logprobs(model, {"params": params}, batch,
                                                         chunk=64), atol=1e-5)


@pytest.mark.parametrize("t", [64, 71])  # an odd length splits 35 + 36
def test_causal_split_equals_full_dense_values_and_gradients(t):
    """dense(causal=True) skips the keys the first half of the queries cannot see: the same
    outputs at every real query and the same gradients, with packed segments, a sliding window
    and soft-capping."""
    rng = np.random.default_rng(2)
    b, k, g, h = 2, 2, 2, 8
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                for shape in ((b, t, k, g, h), (b, t, k, h), (b, t, k, h)))
    segments, positions = packed_layout([(20, 30, t - 55), (t - 3,)], t)
    real = jnp.asarray(segments > 0)
    mask = causal_segment_mask(jnp.asarray(segments))
    qp, kp = jnp.asarray(positions)[:, :, None], jnp.asarray(positions)[:, None, :]
    mask = mask & (kp > qp - 16) & (kp < qp + 16)

    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, kk, v, causal):
        out = attend.dense(q, kk, v, mask, softcap=2.0, dtype=jnp.float32, causal=causal)
        return jnp.sum(jnp.where(real[:, :, None, None, None], out * weights, 0.0)), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    split_grads, split_out = grad(q, kk, v, True)
    full_grads, full_out = grad(q, kk, v, False)
    np.testing.assert_allclose(split_out[real], full_out[real], rtol=1e-6, atol=1e-6)
    for a, b_ in zip(split_grads, full_grads, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    # The split is taken: the first half's queries never see the second half's keys, so
    # keys there only get gradients from the second half (a non-causal mask would differ).
    assert t >= attend.CAUSAL_SPLIT_MIN
    leaky = mask.at[:, 0, t - 1].set(True)
    assert not np.allclose(
        attend.dense(q, kk, v, leaky, softcap=2.0, dtype=jnp.float32, causal=True)[:, 0],
        attend.dense(q, kk, v, leaky, softcap=2.0, dtype=jnp.float32, causal=False)[:, 0])


@pytest.mark.parametrize("scan", [False, True])
def test_branched_examples_attend_the_same_in_chunks(scan):
    """Label scoring's branched examples (a prompt, then each label as a branch that sees the
    prompt and itself only) give the same logits in query chunks as dense, through the
    unrolled blocks and the layer scan; without the branch rule they would differ."""
    from kaggle_pipeline.model.layer_stack import stack

    config = tiny_config("gemma2", num_layers=2, sliding_window=4)
    params = init_params(config, jax.random.key(0))
    if scan:
        params = stack(params, config)
    tokens, _, _ = _packed(config, 22)
    # row 0: a prompt of 8, branches of 3 and 2 at positions 8-10 and 8-9, then padding
    segments = jnp.asarray([[1] * 13 + [0] * 9, [1] * 22])
    branches = jnp.asarray([[0] * 8 + [1] * 3 + [2] * 2 + [0] * 9, [0] * 18 + [1] * 2 + [2] * 2])
    positions = jnp.asarray([list(range(11)) + [8, 9] + [0] * 9,
                             list(range(20)) + [18, 19]])

    def logits(chunk, branch_ids):
        model = Transformer(config, attention_chunk=chunk, scan_layers=scan)
        return jax.jit(lambda p: model.apply({"params": p}, tokens, positions, segments,
                                             branch_ids=branch_ids)[0])(params)

    dense = logits(0, branches)
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(logits(8, branches)[real], dense[real], atol=1e-5)
    # The second branch's tokens really do not see the first branch's.
    assert not np.allclose(logits(8, None)[0, 11:13], dense[0, 11:13], atol=1e-3)
