"""Next-token cross-entropy computed only where a target is: the 256k-way unembedding is the
most expensive matmul of a small model, so we never run it on prompt or padding positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.model import Transformer


def max_targets_per_row(rows: list[dict[str, np.ndarray]], multiple: int = 8) -> int:
    """A static bound on target tokens per row for the whole run (rounded up)."""
    most = max((int(r["targets"].sum()) for r in rows), default=1)
    return max(multiple, -(-most // multiple) * multiple)


def add_target_slots(batch: dict[str, np.ndarray], max_targets: int) -> dict[str, np.ndarray]:
    """Per row, the positions that predict a target (i - 1 for target token i), padded to
    max_targets with index 0 and `loss_valid` False. Host-side, so shapes stay static.

    Branched rows (packing's `sources`: the position that predicts each token) also get
    `loss_tgt`, the target token's own position, since it is then not always source + 1."""
    targets = batch["targets"]
    b = targets.shape[0]
    src = np.zeros((b, max_targets), np.int32)
    tgt = np.zeros((b, max_targets), np.int32)
    valid = np.zeros((b, max_targets), bool)
    for row in range(b):
        idx = np.nonzero(targets[row])[0]
        if len(idx) > max_targets:
            raise ValueError(f"row {row} has {len(idx)} target tokens, more than "
                             f"max_targets={max_targets}")
        src[row, : len(idx)] = batch["sources"][row, idx] if "sources" in batch else idx - 1
        tgt[row, : len(idx)] = idx
        valid[row, : len(idx)] = True
    slots = {"loss_src": src, "loss_valid": valid}
    if "sources" in batch:
        slots["loss_tgt"] = tgt
    return {**batch, **slots}


# Loss positions per row unembedded at once. Past this the logits ([V, rows x positions] f32,
# a GB per TPU core for 8 rows of 1024 targets with a 256k vocabulary, and several such buffers
# in the backward) are made chunk by chunk under jax.checkpoint.
LOSS_CHUNK = 128


def target_logprobs(model: Transformer, variables: dict, batch: dict[str, jax.Array],
                    rngs: dict | None = None, chunk: int = LOSS_CHUNK, *,
                    first_layer: int = 0) -> jax.Array:
    """log p(target token) at each slot of `loss_src`: [B, M] (garbage where not loss_valid).
    `first_layer` > 0: the batch's `stream` is the residual stream entering that layer."""
    src = batch["loss_src"]
    start = {"stream": batch["stream"], "first_layer": first_layer} if first_layer else {}
    picked, _ = model.apply(variables, batch["tokens"], batch["positions"],  # B M D
                            batch["segment_ids"], return_hidden=True, read_at=src, rngs=rngs,
                            branch_ids=batch.get("branch_ids"), **start)
    # The token each slot predicts: the next one, or where `loss_tgt` says (branched rows).
    tgt = batch["loss_tgt"] if "loss_tgt" in batch else src + 1
    labels = jnp.take_along_axis(batch["tokens"], tgt, axis=1)  # B M
    b, m, d = picked.shape
    if m <= chunk:
        return _logprobs(model, variables, picked, labels)
    n = -(-m // chunk)
    pad = n * chunk - m
    picked = jnp.pad(picked, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
    # Chunks along the positions of every row, so each chunk keeps the batch's sharding.
    parts = (jnp.moveaxis(picked.reshape(b, n, chunk, d), 1, 0),
             jnp.moveaxis(labels.reshape(b, n, chunk), 1, 0))
    out = jax.lax.map(jax.checkpoint(lambda part: _logprobs(model, variables, *part)), parts)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :m]


def _logprobs(model: Transformer, variables: dict, picked: jax.Array, labels: jax.Array
              ) -> jax.Array:
    """picked hidden states [B, M, D], their next tokens [B, M] -> log-probabilities [B, M]."""
    b, m, d = picked.shape
    logits = model.apply(variables, picked.reshape(b * m, d),
                         method=Transformer.unembed_vocab_major)  # V N
    logz = jax.nn.logsumexp(logits, axis=0)
    return (jnp.take_along_axis(logits, labels.reshape(1, b * m), axis=0)[0] - logz).reshape(b, m)


def sequence_loss(model: Transformer, variables: dict, batch: dict[str, jax.Array],
                  rngs: dict | None = None, *, first_layer: int = 0
                  ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of target tokens) for one batch."""
    token_loss = -target_logprobs(model, variables, batch, rngs, first_layer=first_layer)
    valid = batch["loss_valid"]
    return jnp.sum(jnp.where(valid, token_loss, 0.0)), jnp.sum(valid)
