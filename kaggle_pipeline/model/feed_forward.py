"""GeGLU feed-forward block (tanh-approximate GELU) with the official weight layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.config import ModelConfig
from kaggle_pipeline.model.layers import project


class FeedForward(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    def _adapted(self, name: str, eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
        return project(self, name, eqn, x, w, scale=self.lora_scale, dropout=self.lora_dropout,
                       deterministic=self.deterministic)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        # Gemma 2 9B/27B and Gemma 3 store the gating weight transposed: (2, hidden, embed).
        if c.transpose_gating_einsum:
            gating = self.param("gating_einsum", init, (2, c.hidden_dim, c.embed_dim))
            eqn = "BTD,FD->BTF"
        else:
            gating = self.param("gating_einsum", init, (2, c.embed_dim, c.hidden_dim))
            eqn = "BTD,DF->BTF"
        linear = self.param("linear", init, (c.hidden_dim, c.embed_dim))
        x = x.astype(self.dtype)
        # Two matmuls, not one stacked einsum: slicing gate and up out of a stacked (2, B, T, F)
        # result costs a full copy of both, forward and backward (9% of a CPU LoRA step).
        gate = self._adapted("gate", eqn, x, gating[0])
        up = self._adapted("up", eqn, x, gating[1])
        hidden = nn.gelu(gate, approximate=True) * up
        return self._adapted("down", "BTF,FD->BTD", hidden, linear)
