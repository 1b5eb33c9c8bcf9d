"""Batched generation: one jitted prefill, then a while-loop of cached decode steps that ends when
every sequence has produced a stop token; `generate_many` runs many prompts through it in
batches of similar length whose size a token budget bounds.

Prompts are left-padded (right-aligned), so every row writes its next key and value at the same
cache slot (model/kv_cache.py) and the prompt's last token is the last column for all rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kaggle_pipeline.inference import placement
from kaggle_pipeline.inference.prompts import truncate_middle
from kaggle_pipeline.model import Transformer, init_cache
from kaggle_pipeline.model.kv_cache import prompt_positions


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


def argmax_vocab_major(logits: jax.Array, block: int = 512) -> jax.Array:
    """argmax over axis 0 of [V, B] logits, the first index on ties like jnp.argmax. In blocks:
    the maximum of each block of rows (a plain, vectorized reduction), the first block holding
    the overall maximum, then the argmax inside it. XLA's CPU argmax (a reduction over value and
    index pairs) took 10x longer over 262k x 32 logits than this."""
    v, b = logits.shape
    block = math.gcd(v, block)
    blocks = logits.reshape(v // block, block, b)
    best_block = jnp.argmax(jnp.max(blocks, axis=1), axis=0)  # [B]
    rows = jnp.take_along_axis(blocks, best_block[None, None, :], axis=0)[0]  # [block, B]
    return (best_block * block + jnp.argmax(rows, axis=0)).astype(jnp.int32)


def next_token(model: Transformer, variables: dict, hidden: jax.Array, rng: jax.Array,
               cfg: SamplingConfig) -> jax.Array:
    """The token after each final hidden state [B, D]. Greedy takes the argmax of vocabulary-major
    logits [V, B]: the 262k-row unembedding runs up to 2x faster on CPU in that layout."""
    if cfg.temperature <= 0.0:
        logits = model.apply(variables, hidden, method=Transformer.unembed_vocab_major)
        return argmax_vocab_major(logits)
    logits = model.apply(variables, hidden, method=Transformer.unembed)
    return sample_token(logits, rng, cfg)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class Sampler:
    """Generates continuations for a batch of prompts of different lengths.

    Prompts are left-padded to a multiple of `pad_multiple` so few shapes get compiled.
    `stop_ids` (e.g. <end_of_turn> and <eos>) end a sequence; they are not returned. On a
    `mesh`, the batch is split over its data and fsdp axes and the weights over fsdp and model
    (model/sharding.py's rules); the cache follows the batch and the kv heads.
    """

    model: Transformer
    stop_ids: Sequence[int]
    pad_multiple: int = 32
    mesh: Mesh | None = None
    chunk_steps: int = 16  # decode steps between checks for finished rows

    def __post_init__(self):
        self._compiled: dict = {}

    def prepare(self, variables: dict) -> dict:
        """The variables generation runs on (placement.prepare): placed on the mesh and, for a
        small model on one f32 device, with the projections held in the decode layout.
        `generate` prepares its variables unless they already are."""
        return placement.prepare(self.model, variables, self.mesh)

    def _build(self, sampling: SamplingConfig) -> tuple[Callable, Callable]:
        """(prefill, decode): prefill(variables, tokens, lengths, rng) -> state;
        decode(variables, state, stop_at) runs steps until step stop_at or until every row is
        done. The state is (step, token, position, cache, done, out, rng)."""
        model, cfg = self.model, self.model.config
        stop = jnp.asarray(list(self.stop_ids), jnp.int32)
        mesh = self.mesh

        def constrain(tree, axes):
            return tree if mesh is None else placement.constrain(tree, axes, mesh)

        def prefill(variables, tokens, lengths, rng):
            b, width = tokens.shape
            positions, segment_ids = prompt_positions(lengths, width)
            cache = init_cache(cfg, b, width + sampling.max_new_tokens, model.dtype)
            cache = constrain(cache, placement.cache_axes(cache))
            hidden, cache = model.apply(variables, tokens, positions, segment_ids, cache, lengths,
                                        return_hidden=True)
            rng, step_rng = jax.random.split(rng)
            token = next_token(model, variables, hidden[:, -1], step_rng, sampling)
            out = jnp.zeros((b, sampling.max_new_tokens), jnp.int32)
            done = jnp.zeros((b,), bool)
            return jnp.zeros((), jnp.int32), token, lengths, cache, done, out, rng

        def decode(variables, state, stop_at):
            b = state[1].shape[0]

            def cond(state):
                i, _, _, _, done, _, _ = state
                return (i < stop_at) & ~jnp.all(done)

            def body(state):
                i, token, pos, cache, done, out, rng = state
                out = jax.lax.dynamic_update_slice_in_dim(
                    out, jnp.where(done, stop[0], token)[:, None], i, axis=1)
                done = done | jnp.isin(token, stop)
                hidden, cache = model.apply(variables, token[:, None], pos[:, None],
                                            jnp.ones((b, 1), jnp.int32), cache,
                                            return_hidden=True)
                rng, step_rng = jax.random.split(rng)
                token = next_token(model, variables, hidden[:, 0], step_rng, sampling)
                return i + 1, token, pos + 1, cache, done, out, rng

            return jax.lax.while_loop(cond, body, state)

        return jax.jit(prefill), jax.jit(decode, donate_argnums=1)

    def generate(self, variables: dict, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> list[list[int]]:
        """The continuation of each prompt (stop token excluded), in the prompts' order.

        Decodes `chunk_steps` steps at a time; when at most half the rows are still going, the
        batch shrinks to the next power of two above them (their cache rows gathered), so one
        long answer no longer keeps a whole batch of finished rows computing."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = _round_up(max(len(p) for p in prompts), self.pad_multiple)
        tokens = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        variables = self.prepare(variables)
        if self.mesh is not None:
            tokens, lengths = placement.place_batch((tokens, lengths), self.mesh)
        if sampling not in self._compiled:
            self._compiled[sampling] = self._build(sampling)
        prefill, decode = self._compiled[sampling]
        state = prefill(variables, tokens, lengths, jax.random.key(seed))
        rows = np.arange(len(prompts))  # the prompt each row of the state decodes
        outputs = np.zeros((len(prompts), sampling.max_new_tokens), np.int32)
        step = 0
        while True:
            step = min(step + self.chunk_steps, sampling.max_new_tokens)
            state = decode(variables, state, jnp.asarray(step, jnp.int32))
            done = np.asarray(state[4])
            if done.all() or step >= sampling.max_new_tokens:
                break
            live = np.flatnonzero(~done)
            if len(live) > len(done) // 2:
                continue
            # Keep the rows still going (and copies of one of them up to a power of two).
            out = np.asarray(state[5])
            finished = done & (rows >= 0)  # -1: a row that only fills the batch
            outputs[rows[finished]] = out[finished]
            keep = np.concatenate([live, np.full((1 << (len(live) - 1).bit_length())
                                                 - len(live), live[0])])
            rows = np.where(np.arange(len(keep)) < len(live), rows[keep], -1)
            state = _take_rows(state, jnp.asarray(keep))
        out = np.asarray(state[5])
        real = rows >= 0
        outputs[rows[real]] = out[real]
        stop = set(self.stop_ids)
        results = []
        for row in outputs:
            seq = []
            for t in row.tolist():
                if t in stop:
                    break
                seq.append(t)
            results.append(seq)
        return results


@jax.jit
def _take_rows(state: tuple, rows: jax.Array) -> tuple:
    """The decode state of the given batch rows (every array with a batch axis is gathered; the
    step count, the cache's shared write slot and the rng are not)."""
    return jax.tree.map(lambda x: x[rows] if x.ndim else x, state)


class Generations(NamedTuple):
    tokens: list[list[int]]  # per prompt, in the prompts' order, stop token excluded
    truncated: int  # prompts cut to max_prompt_len (their middle removed)


def batch_size_for(width: int, max_new_tokens: int, token_budget: int, max_batch: int) -> int:
    """Rows per batch: the largest power of two with rows x (prompt + new tokens) within the
    budget (the KV cache and activations grow with it), at least 1, at most max_batch."""
    rows = max(1, min(max_batch, token_budget // (width + max_new_tokens)))
    return 1 << (rows.bit_length() - 1)


def generate_many(sampler: Sampler, variables: dict, prompts: Sequence[Sequence[int]],
                  sampling: SamplingConfig = SamplingConfig(), *, max_prompt_len: int = 2048,
                  token_budget: int = 16384, max_batch: int = 32, seed: int = 0,
                  on_batch: Callable[[int, int], None] | None = None) -> Generations:
    """Generates for any number of prompts: longest first, in batches of one padded length
    whose size `batch_size_for` picks; a batch's last rows are filled with copies of its first
    prompt up to a power of two, so each length compiles at most a few shapes. Prompts longer
    than max_prompt_len lose their middle (`prompts.truncate_middle`).
    `on_batch(prompts_done, tokens_generated)` is called after each batch (progress)."""
    if not prompts:
        return Generations([], 0)
    variables = sampler.prepare(variables)  # once for every batch
    cut = [truncate_middle(list(p), max_prompt_len) for p in prompts]
    truncated = sum(len(c) < len(p) for c, p in zip(cut, prompts, strict=True))
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]))
    outputs: list[list[int]] = [[] for _ in cut]
    start = 0
    while start < len(order):
        width = _round_up(len(cut[order[start]]), sampler.pad_multiple)
        rows = batch_size_for(width, sampling.max_new_tokens, token_budget, max_batch)
        group = order[start:start + rows]
        start += len(group)
        padded = 1 << (len(group) - 1).bit_length()  # the next power of two
        batch = [cut[i] for i in group]
        batch += [batch[0]] * (padded - len(batch))
        results = sampler.generate(variables, batch, sampling, seed=seed + start)
        for i, seq in zip(group, results, strict=False):
            outputs[i] = seq
        if on_batch is not None:
            on_batch(len(group), sum(len(s) for s in results[:len(group)]))
    return Generations(outputs, truncated)

