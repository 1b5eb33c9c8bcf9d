"""The merged LoRA projection (one matmul against W + s·AB, hand-written backward) against the
plain formula differentiated by JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.model import adapted_einsum

# (einsum, x shape, w shape, a shape, b shape): the projections of attention and the MLP.
PROJECTIONS = [
    ("BTD,NDH->BTNH", (2, 5, 12), (4, 12, 6), (12, 3), (3, 4, 6)),  # q
    ("BTD,KDH->BTKH", (2, 5, 12), (2, 12, 6), (12, 3), (3, 2, 6)),  # k, v
    ("BTNH,NHD->BTD", (2, 5, 4, 6), (4, 6, 12), (4, 6, 3), (3, 12)),  # o
    ("BTD,FD->BTF", (2, 5, 12), (20, 12), (12, 3), (3, 20)),  # gate, up (transposed)
    ("BTF,FD->BTD", (2, 5, 20), (20, 12), (20, 3), (3, 12)),  # down
]


def _arrays(shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize("projection", PROJECTIONS, ids=[p[0] for p in PROJECTIONS])
def test_merged_matches_separate_in_value_and_gradients(projection):
    eqn, *shapes = projection
    x, w, a, b = _arrays(shapes)
    cotangent = _arrays([jnp.einsum(eqn, x, w).shape], seed=1)[0]
    scale = 2.0

    def loss(fn, x, a, b):
        return jnp.sum(fn(eqn, x, w, a, b, scale) * cotangent)

    want = jax.value_and_grad(lambda *v: loss(adapted_einsum.separate, *v), argnums=(0, 1, 2))
    got = jax.value_and_grad(lambda *v: loss(adapted_einsum.merged, *v), argnums=(0, 1, 2))
    (want_value, want_grads), (got_value, got_grads) = want(x, a, b), got(x, a, b)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for name, g, h in zip(("x", "a", "b"), got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4, err_msg=f"d{name}")


def test_merged_with_zero_b_is_the_base_projection_exactly():
    eqn, *shapes = PROJECTIONS[0]
    x, w, a, b = _arrays(shapes)
    base = jnp.einsum(eqn, x, w)
    merged = adapted_einsum.merged(eqn, x, w, a, jnp.zeros_like(b), 2.0)
    assert np.array_equal(np.asarray(merged), np.asarray(base))


def test_merged_gives_no_gradient_to_the_frozen_weight():
    eqn, *shapes = PROJECTIONS[2]
    x, w, a, b = _arrays(shapes)
    dw = jax.grad(lambda w: jnp.sum(adapted_einsum.merged(eqn, x, w, a, b, 2.0)))(w)
    assert not np.any(np.asarray(dw))


def test_subscripts_follow_the_projection():
    s = adapted_einsum.subscripts("BTNH,NHD->BTD")
    assert (s.a, s.b, s.low, s.merge) == ("NHr", "rD", "BTr", "NHr,rD->NHD")
    with pytest.raises(ValueError, match="reserved for the LoRA rank"):
        adapted_einsum.subscripts("BTr,rD->BTD")
