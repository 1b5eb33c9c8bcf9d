"""Batched generation: one jitted prefill, then a while-loop of cached decode steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.model import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None


def sample_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] (f32) -> token ids [B]."""
    if cfg.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k is not None:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Smallest set whose mass reaches top_p: drop tokens strictly below its last member.
        cutoff_index = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class Sampler:
    """Generates continuations for a batch of prompts of different lengths.

    Prompts are right-padded to a multiple of `pad_multiple` so few shapes get compiled.
    `stop_ids` (e.g. <end_of_turn> and <eos>) end a sequence; they are not returned.
    """

    model: Transformer
    stop_ids: Sequence[int]
    pad_multiple: int = 32

    def __post_init__(self):
        self._compiled = {}

    def _build(self, sampling: SamplingConfig):
        model, cfg = self.model, self.model.config
        stop = jnp.asarray(list(self.stop_ids), jnp.int32)

        def run(variables, tokens, lengths, rng):
            b, length = tokens.shape
            max_len = length + sampling.max_new_tokens
            positions = jnp.broadcast_to(jnp.arange(length), (b, length))
            segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
            cache = init_cache(cfg, b, max_len, model.dtype)
            hidden, cache = model.apply(variables, tokens, positions, segment_ids, cache, lengths,
                                        return_hidden=True)
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            logits = model.apply(variables, last, method=Transformer.unembed)
            rng, step_rng = jax.random.split(rng)
            token = sample_token(logits, step_rng, sampling)
            out = jnp.zeros((b, sampling.max_new_tokens), jnp.int32)
            done = jnp.zeros((b,), bool)

            def cond(state):
                i, _, _, _, done, _, _ = state
                return (i < sampling.max_new_tokens) & ~jnp.all(done)

            def body(state):
                i, token, pos, cache, done, out, rng = state
                out = out.at[:, i].set(jnp.where(done, stop[0], token))
                done = done | jnp.isin(token, stop)
                logits, cache = model.apply(variables, token[:, None], pos[:, None],
                                            jnp.ones((b, 1), jnp.int32), cache)
                rng, step_rng = jax.random.split(rng)
                token = sample_token(logits[:, 0], step_rng, sampling)
                return i + 1, token, pos + 1, cache, done, out, rng

            state = (0, token, lengths, cache, done, out, rng)
            return jax.lax.while_loop(cond, body, state)[5]

        return jax.jit(run)

    def generate(self, variables: dict, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        length = _round_up(max(len(p) for p in prompts), self.pad_multiple)
        tokens = np.zeros((len(prompts), length), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        if sampling not in self._compiled:
            self._compiled[sampling] = self._build(sampling)
        out = np.asarray(self._compiled[sampling](variables, tokens, lengths,
                                                  jax.random.key(seed)))
        stop = set(self.stop_ids)
        results = []
        for row in out:
            seq = []
            for t in row.tolist():
                if t in stop:
                    break
                seq.append(t)
            results.append(seq)
        return results
