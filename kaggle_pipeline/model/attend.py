"""softmax(q·k) v over grouped heads: dense over a [B, T, S] mask, or chunk by chunk.

Dense holds [B, T, K, G, S] f32 logits: quadratic in the sequence. `chunked` walks the queries in
chunks of C, each against every key, its mask built from positions and segment ids inside the
chunk (same rule as `transformer.causal_segment_mask`, plus the sliding window), under
`jax.checkpoint` so the backward recomputes a chunk's logits instead of keeping them: memory
C x S per step instead of T x S, the same values (the softmax of each row is exact, no online
rescaling). Plain JAX, so it runs and compiles on every backend and keeps Gemma 2's soft-capping,
which rules out cuDNN's fused attention (`jax.nn.dot_product_attention` has no logit soft-cap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kaggle_pipeline.model.precision import einsum

# The official fill value for masked logits (finite, so fully-masked rows stay NaN-free).
MASK_VALUE = -2.3819763e38


def _probs(logits: jax.Array, mask: jax.Array, softcap: float | None, dtype) -> jax.Array:
    """f32 logits [B, T, K, G, S], mask [B, T, S] -> probabilities in `dtype`."""
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, :, None, None, :], logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


# Self-attention at least this long skips the keys its first half of queries cannot see.
CAUSAL_SPLIT_MIN = 64


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
          softcap: float | None, dtype, causal: bool = False) -> jax.Array:
    """q [B, T, K, G, H] (scaled), k, v [B, S, K, H], mask [B, T, S] -> [B, T, K, G, H].

    causal: the caller's promise that keys are the queries' own tokens (S == T) and the mask
    hides every later one (mask[t, s] False for s > t). Then the first half of the queries runs
    against the first half of the keys only: a quarter of the logits is never computed, the
    same values for every query that sees a key (7% of a CPU train step at 4 x 256). Halves,
    not finer blocks: more, smaller einsums and the concatenation cost more than they save.
    """
    t = q.shape[1]
    if causal and t == k.shape[1] and t >= CAUSAL_SPLIT_MIN:
        h = t // 2
        first = _dense(q[:, :h], k[:, :h], v[:, :h], mask[:, :h, :h], softcap, dtype)
        second = _dense(q[:, h:], k, v, mask[:, h:], softcap, dtype)
        return jnp.concatenate([first, second], axis=1)
    return _dense(q, k, v, mask, softcap, dtype)


def _dense(q, k, v, mask, softcap, dtype):
    logits = einsum("BTKGH,BSKH->BTKGS", q, k.astype(q.dtype), "attention")
    probs = _probs(logits, mask, softcap, dtype)
    return einsum("BTKGS,BSKH->BTKGH", probs, v.astype(dtype), "attention").astype(dtype)


def same_branch(q_branch: jax.Array, k_branch: jax.Array) -> jax.Array:
    """[B, C, S]: for examples that end in branches (label scoring: a prompt, then each label's
    tokens; 0 = the trunk), a key is visible from the trunk or from the query's own branch."""
    key = k_branch[:, None, :]
    return (key == 0) | (key == q_branch[:, :, None])


def visible(q_index: jax.Array, q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array,
            k_seg: jax.Array, window: int | None, q_branch: jax.Array | None = None,
            k_branch: jax.Array | None = None) -> jax.Array:
    """[B, C, S]: key s is visible from query t: earlier (by index) in the same non-padding
    segment (and branch, `same_branch`, when given), and within the sliding window (by
    position) when there is one."""
    s = k_seg.shape[-1]
    mask = ((jnp.arange(s)[None, None, :] <= q_index[None, :, None])
            & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0))
    if q_branch is not None:
        mask = mask & same_branch(q_branch, k_branch)
    if window is not None:
        qp, kp = q_pos[:, :, None], k_pos[:, None, :]
        mask = mask & (kp > qp - window) & (kp < qp + window)
    return mask


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, *, chunk: int, window: int | None, softcap: float | None,
            dtype, branch_ids: jax.Array | None = None) -> jax.Array:
    """Self-attention of a whole sequence (keys = queries' tokens) in query chunks of `chunk`:
    q [B, T, K, G, H], k, v [B, T, K, H], positions, segment_ids and branch_ids [B, T]."""
    b, t = q.shape[:2]
    padded = -(-t // chunk) * chunk
    pad = padded - t
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    # padding queries sit in segment 0: masked everywhere, dropped below
    q_pos, q_seg = (jnp.pad(x, ((0, 0), (0, pad))) for x in (positions, segment_ids))
    n = padded // chunk
    k = k.astype(q.dtype)
    v = v.astype(dtype)

    def split(x):  # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        qc, index, qp, qs, *qb = args
        mask = visible(index, qp, qs, positions, segment_ids, window, *qb,
                       branch_ids if qb else None)
        probs = _probs(einsum("BTKGH,BSKH->BTKGS", qc, k, "attention"), mask, softcap, dtype)
        return einsum("BTKGS,BSKH->BTKGH", probs, v, "attention").astype(dtype)

    index = jnp.arange(padded).reshape(n, chunk)
    args = (split(q), index, split(q_pos), split(q_seg))
    if branch_ids is not None:
        args += (split(jnp.pad(branch_ids, ((0, 0), (0, pad)))),)
    out = jax.lax.map(one, args)
    out = jnp.moveaxis(out, 0, 1).reshape(b, padded, *out.shape[3:])
    return out[:, :t]
