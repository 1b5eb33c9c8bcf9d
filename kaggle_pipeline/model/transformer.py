"""The Gemma decoder: embed, N blocks of (attention, GeGLU), final norm, tied unembedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.model import kv_cache
from kaggle_pipeline.model.attention import Attention
from kaggle_pipeline.model.config import AttentionKind, ModelConfig
from kaggle_pipeline.model.feed_forward import FeedForward
from kaggle_pipeline.model.layers import Adaptation, RMSNorm


class Block(nn.Module):
    config: ModelConfig
    kind: AttentionKind
    dtype: jnp.dtype = jnp.float32
    adapt: Adaptation = Adaptation()

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, lengths=None):
        c = self.config
        lora = dict(adapt=self.adapt, dtype=self.dtype)
        norm = dict(eps=c.norm_eps, dtype=self.dtype)
        h = RMSNorm(name="pre_attention_norm", **norm)(x)
        h, cache = Attention(c, self.kind, name="attn", **lora)(h, positions, mask, cache, lengths)
        x = x + RMSNorm(name="post_attention_norm", **norm)(h)
        h = RMSNorm(name="pre_ffw_norm", **norm)(x)
        h = FeedForward(c, name="mlp", **lora)(h)
        x = x + RMSNorm(name="post_ffw_norm", **norm)(h)
        return x, cache


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids (0 = padding) -> [B, T, T]: earlier tokens of the same example."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = segment_ids[:, None, :] != 0
    return causal[None] & same & real


class Transformer(nn.Module):
    """Gemma 2 / Gemma 3 text decoder. Param names follow the official Flax layout."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; params keep whatever dtype they are stored in
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    remat: bool = False  # recompute each block in the backward pass to save memory

    def setup(self):
        c = self.config
        self.input_embedding = self.param(
            "embedder", lambda rng: {"input_embedding": 0.02 * jax.random.normal(
                rng, (c.vocab_size, c.embed_dim))})
        block = nn.remat(Block) if self.remat else Block
        adapt = Adaptation(self.lora_scale, self.lora_dropout, self.deterministic)
        self.blocks = [block(c, kind, dtype=self.dtype, adapt=adapt, name=f"layer_{i}")
                       for i, kind in enumerate(c.attention_kinds)]
        self.final_norm = RMSNorm(eps=c.norm_eps, dtype=self.dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: kv_cache.Cache | None = None, lengths: jax.Array | None = None,
                 *, return_hidden: bool = False):
        """tokens, positions, segment_ids: [B, T] -> (logits [B, T, V] or hidden [B, T, D], cache).

        `segment_ids` (0 = padding) keep packed examples from attending to each other.
        With a cache, T > 1 is a prefill of left-padded prompts of `lengths`; T == 1 a decode step.
        """
        table = self.input_embedding["input_embedding"]
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        # The official code multiplies by sqrt(embed_dim) rounded to the compute dtype.
        x = x * jnp.sqrt(self.config.embed_dim).astype(self.dtype)
        mask = causal_segment_mask(segment_ids)
        new_cache = {} if cache is not None else None
        for i, block in enumerate(self.blocks):
            name = f"layer_{i}"
            x, layer_cache = block(x, positions, mask, None if cache is None else cache[name],
                                   lengths)
            if cache is not None:
                new_cache[name] = layer_cache
        x = self.final_norm(x)
        if return_hidden:
            return x, new_cache
        return self.unembed(x), new_cache

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> f32 logits [..., V] (tied embedding, final soft-cap)."""
        table = self.input_embedding["input_embedding"].astype(self.dtype)
        logits = jnp.einsum("...D,VD->...V", hidden.astype(self.dtype), table)
        return self._softcap(logits.astype(jnp.float32))

    def unembed_vocab_major(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [N, D] -> f32 logits [V, N]. For training: with the vocabulary as the
        leading axis, the loss and its gradient back to the hidden states (a 262k-long
        contraction) run about 1.5x faster on CPU than from [N, V] logits."""
        table = self.input_embedding["input_embedding"].astype(self.dtype)
        logits = jnp.einsum("VD,ND->VN", table, hidden.astype(self.dtype))
        return self._softcap(logits.astype(jnp.float32))

    def _softcap(self, logits: jax.Array) -> jax.Array:
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits


def init_params(config: ModelConfig, rng: jax.Array, dtype: jnp.dtype = jnp.float32) -> dict:
    """Random params in the official nested layout (for tests and from-scratch runs)."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = model.init(rng, tokens, tokens, tokens + 1)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def abstract_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """Shapes and dtypes of the params, without allocating them: the contract for loaders."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
