"""The Gemma decoder: embed, N blocks of (attention, GeGLU), final norm, tied unembedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kaggle_pipeline.model import attend, kv_cache, layer_stack
from kaggle_pipeline.model.attention import Attention
from kaggle_pipeline.model.config import AttentionKind, ModelConfig
from kaggle_pipeline.model.feed_forward import FeedForward
from kaggle_pipeline.model.layers import LORA, Adaptation, RMSNorm, gather_positions
from kaggle_pipeline.model.precision import einsum


class Block(nn.Module):
    config: ModelConfig
    kind: AttentionKind
    dtype: jnp.dtype = jnp.float32
    adapt: Adaptation = Adaptation()
    attention_chunk: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, lengths=None, segment_ids=None,
                 read_at=None, branch_ids=None):
        """x [B, T, D] -> [B, T, D]; with `read_at` [B, M] (no cache, a mask), only those
        positions go on past the keys and values: -> [B, M, D]."""
        c = self.config
        lora = dict(adapt=self.adapt, dtype=self.dtype)
        norm = dict(eps=c.norm_eps, dtype=self.dtype)
        h = RMSNorm(name="pre_attention_norm", **norm)(x)
        h, cache = Attention(c, self.kind, name="attn", chunk=self.attention_chunk, **lora)(
            h, positions, mask, cache, lengths, segment_ids, read_at=read_at,
            branch_ids=branch_ids)
        if read_at is not None:
            x = gather_positions(x, read_at)
        x = x + RMSNorm(name="post_attention_norm", **norm)(h).astype(x.dtype)
        h = RMSNorm(name="pre_ffw_norm", **norm)(x)
        h = FeedForward(c, name="mlp", **lora)(h)
        x = x + RMSNorm(name="post_ffw_norm", **norm)(h).astype(x.dtype)
        return x, cache


class Group(nn.Module):
    """One repetition of the attention pattern (a block per kind): the body of the layer scan.
    Its blocks are named like DeepMind's stacked checkpoints (`attention_type_j`)."""

    config: ModelConfig
    kinds: tuple[AttentionKind, ...]
    dtype: jnp.dtype = jnp.float32
    adapt: Adaptation = Adaptation()
    remat_policy: str | None = None  # None: no remat
    attention_chunk: int = 0

    @nn.compact
    def __call__(self, x, cache, positions, mask, lengths, segment_ids, branch_ids):
        block = _maybe_remat(Block, self.remat_policy)
        new_cache = None if cache is None else {}
        for j, kind in enumerate(self.kinds):
            name = layer_stack.slot_name(j)
            x, layer_cache = block(self.config, kind, dtype=self.dtype, adapt=self.adapt,
                                   attention_chunk=self.attention_chunk, name=name)(
                x, positions, mask, None if cache is None else cache[name], lengths, segment_ids,
                None, branch_ids)
            if cache is not None:
                new_cache[name] = layer_cache
        return x, new_cache


# Remat policies (model.remat_policy): what the backward keeps instead of recomputing.
# bf16 matmuls are found by name (precision.einsum), f32 ones as dots.
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": None,  # nothing: every block is recomputed whole
    "dots": _policies.save_from_both_policies(  # the projections' outputs, not attention's
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names("projection")),
}
# A scan without remat still runs its body under a policy, "dots": a plain scan would save the
# weights each layer gathered over fsdp as residuals (a whole replicated copy of the model on
# every device), and keeping attention's f32 logits too (all dots) costs more than unrolled
# layers do (2B, 8 x 1024 on a v3 core: 14.7 GB against 12.8 GB unrolled and 2.5 GB "dots").
SCAN_KEEPS = "dots"


def _maybe_remat(module, policy: str | None):
    if policy is None:
        return module
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}: one of {sorted(REMAT_POLICIES)}")
    return nn.remat(module, policy=REMAT_POLICIES[policy], prevent_cse=False)


def causal_segment_mask(segment_ids: jax.Array, branch_ids: jax.Array | None = None
                        ) -> jax.Array:
    """[B, T] segment ids (0 = padding) -> [B, T, T]: earlier tokens of the same example.

    branch_ids [B, T]: an example may end in branches (label scoring: one prompt, then each
    label's tokens). A token of branch j > 0 sees the example's trunk (branch 0) and its own
    branch only; trunk tokens see the trunk."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = segment_ids[:, None, :] != 0
    mask = causal[None] & same & real
    if branch_ids is not None:
        mask = mask & attend.same_branch(branch_ids, branch_ids)
    return mask


class Transformer(nn.Module):
    """Gemma 2 / Gemma 3 text decoder. Param names follow the official Flax layout (per layer),
    or its stacked form with `scan_layers` (model/layer_stack.py)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; params keep whatever dtype they are stored in
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    remat: bool = False  # recompute each block in the backward pass to save memory
    remat_policy: str = "full"  # with remat: what is kept (REMAT_POLICIES)
    scan_layers: bool = False  # one compiled block per pattern position, scanned over groups
    attention_chunk: int = 0  # sequences longer than this attend in query chunks (0: never)

    def setup(self):
        c = self.config
        self.input_embedding = self.param(
            "embedder", lambda rng: {"input_embedding": 0.02 * jax.random.normal(
                rng, (c.vocab_size, c.embed_dim))})
        policy = self.remat_policy if self.remat else None
        adapt = Adaptation(self.lora_scale, self.lora_dropout, self.deterministic)
        lay = layer_stack.layout(c)
        first_unrolled = lay.scanned if self.scan_layers else 0
        if self.scan_layers and lay.groups:
            group = nn.scan(Group, variable_axes={"params": 0, LORA: 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0,) + (nn.broadcast,) * 5, length=lay.groups)
            self.stack = group(c, c.attention_kinds[:lay.period], dtype=self.dtype, adapt=adapt,
                               remat_policy=policy or SCAN_KEEPS,
                               attention_chunk=self.attention_chunk, name=layer_stack.STACK)
        block = _maybe_remat(Block, policy)
        self.blocks = {i: block(c, c.attention_kinds[i], dtype=self.dtype, adapt=adapt,
                                attention_chunk=self.attention_chunk, name=f"layer_{i}")
                       for i in range(first_unrolled, c.num_layers)}
        self.final_norm = RMSNorm(eps=c.norm_eps, dtype=self.dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: kv_cache.Cache | None = None, lengths: jax.Array | None = None,
                 *, return_hidden: bool = False, read_at: jax.Array | None = None,
                 branch_ids: jax.Array | None = None, stop_before: int | None = None,
                 stream: jax.Array | None = None, first_layer: int = 0):
        """tokens, positions, segment_ids: [B, T] -> (logits [B, T, V] or hidden [B, T, D], cache).

        `segment_ids` (0 = padding) keep packed examples from attending to each other.
        With a cache, T > 1 is a prefill of left-padded prompts of `lengths`; T == 1 a decode step.
        The cache is per layer (`init_cache`) whatever the params' layout.
        `read_at` [B, M]: only the outputs at these positions are wanted ([B, M, ...] comes
        back). The last layer then runs its queries, its output projection and its MLP at those
        positions alone (it still makes keys and values at every one), when it is unrolled, the
        attention dense and M at most half of T; otherwise the outputs are computed everywhere
        and gathered. Loss and label scoring read a few positions a row: 5% of a CPU train step.
        `branch_ids` [B, T]: examples that end in branches (`attend.same_branch`).
        `stop_before`: return the residual stream entering that layer ([B, T, D] f32) alone.
        `stream`, `first_layer`: start from that stream, entering layer `first_layer`, instead
        of the tokens' embeddings (the frozen layers below computed once: training/
        frozen_prefix.py). Both need the layers unrolled.
        """
        if (stop_before is not None or first_layer) and self.scan_layers:
            raise ValueError("stop_before and first_layer need unrolled layers "
                             "(scan_layers = False)")
        if (stream is None) != (first_layer == 0):
            raise ValueError("give `stream` and `first_layer` > 0 together")
        if stream is None:
            table = self.input_embedding["input_embedding"]
            # The residual stream stays f32 whatever the compute dtype: each block adds its bf16
            # output to it in f32 (a bf16 stream is what makes bf16 logits drift: BENCHMARKS.md).
            x = jnp.take(table, tokens, axis=0).astype(self.dtype).astype(jnp.float32)
            # The official code multiplies by sqrt(embed_dim) rounded to the compute dtype.
            x = x * jnp.sqrt(self.config.embed_dim).astype(self.dtype).astype(jnp.float32)
        else:
            x = stream.astype(jnp.float32)
        chunked = 0 < self.attention_chunk < tokens.shape[1]
        mask = None if chunked else causal_segment_mask(segment_ids, branch_ids)
        new_cache = {} if cache is not None else None
        if self.scan_layers and layer_stack.layout(self.config).groups:
            stacked = None if cache is None else layer_stack.stack(cache, self.config)
            x, stacked = self.stack(x, None if stacked is None else stacked[layer_stack.STACK],
                                    positions, mask, lengths, segment_ids, branch_ids)
            if cache is not None:
                new_cache = layer_stack.unstack({layer_stack.STACK: stacked}, self.config)
        last = max(self.blocks, default=None)
        early_read = (read_at is not None and cache is None and mask is not None
                      and last == self.config.num_layers - 1
                      and 2 * read_at.shape[1] <= tokens.shape[1])
        for i, block in self.blocks.items():
            if i == stop_before:
                return x
            if i < first_layer:
                continue
            name = f"layer_{i}"
            x, layer_cache = block(x, positions, mask, None if cache is None else cache[name],
                                   lengths, segment_ids, read_at if early_read and i == last
                                   else None, branch_ids)
            if cache is not None:
                new_cache[name] = layer_cache
        if read_at is not None and not early_read:
            x = gather_positions(x, read_at)
        x = self.final_norm(x)
        if return_hidden:
            return x, new_cache
        return self.unembed(x), new_cache

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> f32 logits [..., V] (tied embedding, final soft-cap)."""
        table = self.input_embedding["input_embedding"].astype(self.dtype)
        logits = einsum("...D,VD->...V", hidden.astype(self.dtype), table)
        return self._softcap(logits)

    def unembed_vocab_major(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [N, D] -> f32 logits [V, N]. For training: with the vocabulary as the
        leading axis, the loss and its gradient back to the hidden states (a 262k-long
        contraction) run about 1.5x faster on CPU than from [N, V] logits."""
        table = self.input_embedding["input_embedding"].astype(self.dtype)
        logits = einsum("VD,ND->VN", table, hidden.astype(self.dtype))
        return self._softcap(logits)

    def _softcap(self, logits: jax.Array) -> jax.Array:
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits


def init_params(config: ModelConfig, rng: jax.Array, dtype: jnp.dtype = jnp.float32,
                scan_layers: bool = False) -> dict:
    """Random params in the official nested layout, or its stacked form with `scan_layers`
    (for tests and from-scratch runs)."""
    model = Transformer(config, scan_layers=scan_layers)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = model.init(rng, tokens, tokens, tokens + 1)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def abstract_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32,
                    scan_layers: bool = False) -> dict:
    """Shapes and dtypes of the params, without allocating them: the contract for loaders."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype, scan_layers))
