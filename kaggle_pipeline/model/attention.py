"""Grouped-query attention with RoPE, optional QK-norm, soft-capping and sliding windows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.model import attend, kv_cache
from kaggle_pipeline.model.config import AttentionKind, ModelConfig
from kaggle_pipeline.model.layers import (
    DECODE,
    Adaptation,
    Einsum,
    RMSNorm,
    gather_positions,
    project,
)
from kaggle_pipeline.model.lora import target
from kaggle_pipeline.model.precision import einsum
from kaggle_pipeline.model.rope import apply_rope


class Attention(nn.Module):
    config: ModelConfig
    kind: AttentionKind
    dtype: jnp.dtype = jnp.float32
    adapt: Adaptation = Adaptation()
    chunk: int = 0  # query chunk length of attend.chunked, used when the mask is None

    def setup(self):
        c = self.config
        if c.use_qkv_einsum:
            self.qkv_einsum = Einsum((3, c.num_heads, c.embed_dim, c.head_dim))
        else:
            self.q_einsum = Einsum((c.num_heads, c.embed_dim, c.head_dim))
            self.kv_einsum = Einsum((2, c.num_kv_heads, c.embed_dim, c.head_dim))
        self.attn_vec_einsum = Einsum((c.num_heads, c.head_dim, c.embed_dim))
        if c.use_qk_norm:
            self._query_norm = RMSNorm(eps=c.norm_eps, dtype=self.dtype)
            self._key_norm = RMSNorm(eps=c.norm_eps, dtype=self.dtype)

    def _adapted(self, name: str, x: jax.Array) -> jax.Array:
        """Projection `name` (a row of lora.TARGETS) of x, with its LoRA update if any."""
        row = target(name, self.config)
        w = getattr(self, row.weight.split("/")[0]).weight
        w = w if row.index is None else w[row.index]
        return project(self, name, row.eqn, x.astype(self.dtype), w, self.adapt)

    def _project(self, x: jax.Array, queries_from: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v of x; q of `queries_from` instead when given (a subset of x's positions)."""
        c = self.config
        if queries_from is not None:
            return (self._adapted("q", queries_from), self._adapted("k", x),
                    self._adapted("v", x))
        if self.has_variable(DECODE, "qkv"):  # decoding: one merged matmul (decode_layout.py)
            y = einsum("BTD,ED->BTE", x.astype(self.dtype), self.get_variable(DECODE, "qkv"))
            b, t = x.shape[:2]
            nh, kh = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            q, k, v = jnp.split(y.astype(self.dtype), (nh, nh + kh), axis=-1)
            return (q.reshape(b, t, c.num_heads, c.head_dim),
                    k.reshape(b, t, c.num_kv_heads, c.head_dim),
                    v.reshape(b, t, c.num_kv_heads, c.head_dim))
        # One matmul per projection, each with its own LoRA factors (PEFT's q/k/v_proj).
        return self._adapted("q", x), self._adapted("k", x), self._adapted("v", x)

    def _output(self, encoded: jax.Array) -> jax.Array:
        if self.has_variable(DECODE, "o"):
            b, t, n, h = encoded.shape
            return einsum("BTE,ED->BTD", encoded.reshape(b, t, n * h),
                          self.get_variable(DECODE, "o")).astype(self.dtype)
        return self._adapted("o", encoded)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                 cache: kv_cache.LayerCache | None = None, lengths: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, read_at: jax.Array | None = None,
                 branch_ids: jax.Array | None = None,
                 ) -> tuple[jax.Array, kv_cache.LayerCache | None]:
        """x [B, T, D]; positions [B, T]; mask [B, T, T] (which earlier tokens each may see).

        With a cache: T > 1 is a prefill from an empty cache (left-padded prompts of `lengths`),
        T == 1 is one decode step that attends over the cache. mask None: the queries run in
        chunks of `self.chunk` (attend.chunked), each chunk's mask made from `segment_ids` (and
        `branch_ids` for examples that end in branches; the mask already says it otherwise).
        read_at [B, M] (no cache, a mask): queries only at these positions, against every key;
        returns [B, M, D].
        """
        c = self.config
        key_positions = positions
        if read_at is not None:
            positions = gather_positions(positions, read_at)
            mask = gather_positions(mask, read_at)
            q, k, v = self._project(x, gather_positions(x, read_at))
        else:
            q, k, v = self._project(x)
        if c.use_qk_norm:
            q = self._query_norm(q)
            k = self._key_norm(k)
        base, scale = c.rope(self.kind)
        q = apply_rope(q, positions, base=base, scale=scale) * c.query_pre_attn_scalar
        k = apply_rope(k, key_positions, base=base, scale=scale)

        new_cache = None
        if cache is not None and x.shape[1] == 1:
            new_cache = kv_cache.write_step(cache, k, v, positions)
            k, v, key_positions = new_cache["k"], new_cache["v"], new_cache["pos"]
            # Decode: every filled slot at or before the query position is visible.
            kpos = key_positions[:, None, :]
            mask = (kpos >= 0) & (kpos <= positions[..., None])
        elif cache is not None:
            new_cache = kv_cache.fill_from_prefill(cache, k, v, lengths)

        window = c.sliding_window if self.kind == AttentionKind.LOCAL else None
        b, t, n, h = q.shape
        q = q.reshape(b, t, c.num_kv_heads, n // c.num_kv_heads, h)
        if mask is None:
            encoded = attend.chunked(q, k, v, positions, segment_ids, chunk=self.chunk,
                                     window=window, softcap=c.attn_logit_softcap,
                                     dtype=self.dtype, branch_ids=branch_ids)
        else:
            if window is not None:
                qpos, kpos = positions[:, :, None], key_positions[:, None, :]
                mask = mask & (kpos > qpos - window) & (kpos < qpos + window)
            # Training, scoring and prefill attend within the tokens given, causally.
            encoded = attend.dense(q, k, v, mask, softcap=c.attn_logit_softcap, dtype=self.dtype,
                                   causal=read_at is None and x.shape[1] > 1)
        encoded = encoded.reshape(b, t, n, h)
        return self._output(encoded), new_cache
