"""One jitted, sharded optimizer step over either LoRA factors or all params.

State is a plain dict pytree: {"step", "trainable", "opt_state"}. The frozen base params are a
separate argument: never differentiated, never in the optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kaggle_pipeline.checkpoints.common import flatten
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.model import sharding as shd
from kaggle_pipeline.model.loss import sequence_loss

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_src", "loss_valid")


def abstract_batch(keys: tuple[str, ...], rows: int, length: int, targets: int, mesh: Mesh,
                   embed_dim: int = 0) -> dict:
    """The batch entries `keys` for `rows` rows of `length` tokens with `targets` loss slots
    each (`embed_dim`: the width of a `stream`), as shapes with the batch sharding, nothing
    allocated: what a program is compiled for ahead of time."""
    shapes = {"tokens": ((rows, length), jnp.int32),
              "positions": ((rows, length), jnp.int32),
              "segment_ids": ((rows, length), jnp.int32),
              "loss_src": ((rows, targets), jnp.int32),
              "loss_valid": ((rows, targets), jnp.bool_),
              "stream": ((rows, length, embed_dim), jnp.float32),
              "loss_scale": ((rows,), jnp.float32)}
    sharding = shd.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sharding) for k in keys}


@dataclasses.dataclass
class Trainer:
    """Holds the compiled step and the shardings it was compiled for."""

    model: Transformer
    optimizer: optax.GradientTransformation
    mesh: Mesh
    mode: str  # "lora" | "full"
    seed: int = 0
    accumulate_steps: int = 1  # micro-batches per update: the optimizer's, said again here
    # > 0: batches carry `stream`, the residual stream entering this layer, computed once for
    # the frozen layers below it (training/frozen_prefix.py); the step runs the layers above.
    first_layer: int = 0

    def variables(self, trainable: dict, frozen: dict) -> dict:
        if self.mode == "lora":
            return {"params": frozen, "lora": trainable}
        return {"params": trainable}

    def init_state(self, trainable: dict) -> dict:
        """The step donates its state: `trainable` must not be used by the caller afterwards."""
        trainable = jax.device_put(trainable, self.trainable_shardings(trainable))
        opt_state = jax.jit(self.optimizer.init,
                            out_shardings=self._opt_shardings(trainable))(trainable)
        step = jax.device_put(jnp.zeros((), jnp.int32), shd.replicated(self.mesh))
        return {"step": step, "trainable": trainable, "opt_state": opt_state}

    def abstract_state(self, trainable: dict) -> dict:
        """What `init_state` makes, as shapes and shardings only (for AOT compilation)."""
        trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        state = jax.eval_shape(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t,
                                          "opt_state": self.optimizer.init(t)}, trainable)
        return shd.placed_shapes(state, self.state_shardings(state))

    def trainable_shardings(self, trainable: dict):
        return shd.param_shardings(trainable, self.mesh, self.model.config.transpose_gating_einsum)

    def frozen_shardings(self, frozen: dict):
        return shd.param_shardings(frozen, self.mesh, self.model.config.transpose_gating_einsum)

    def _opt_shardings(self, trainable: dict):
        flat = flatten(self.trainable_shardings(trainable))
        abstract = jax.eval_shape(self.optimizer.init, trainable)
        return shd.like_params_shardings(abstract, flat, self.mesh)

    def state_shardings(self, state: dict):
        return {"step": shd.replicated(self.mesh),
                "trainable": self.trainable_shardings(state["trainable"]),
                "opt_state": self._opt_shardings(state["trainable"])}

    def compile_step(self, state: dict, frozen: dict) -> Callable:
        model, optimizer = self.model, self.optimizer
        dropout_key = jax.random.key(self.seed)

        def step(state, frozen, batch):
            rngs = {"dropout": jax.random.fold_in(dropout_key, state["step"])}

            def loss_fn(trainable):
                total, count = sequence_loss(model, self.variables(trainable, frozen), batch,
                                             rngs, first_layer=self.first_layer)
                return total * batch["loss_scale"][0], (total, count)

            (_, (total, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["trainable"])
            loss = total / jnp.maximum(count, 1)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
            trainable = optax.apply_updates(state["trainable"], updates)
            metrics = {"loss": loss, "loss_sum": total, "target_tokens": count,
                       "grad_norm": optax.tree.norm(grads)}
            return {"step": state["step"] + 1, "trainable": trainable,
                    "opt_state": opt_state}, metrics

        state_sh = self.state_shardings(state)
        frozen_sh = self.frozen_shardings(frozen)
        batch_sh = {k: shd.batch_sharding(self.mesh) for k in self._step_keys()}
        return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, shd.replicated(self.mesh)),
                       donate_argnums=(0,))

    def abstract_batch(self, rows: int, length: int, targets: int) -> dict:
        """What `put_batch` makes for `rows` rows of `length` tokens with `targets` loss slots
        each, as shapes and shardings only (for AOT compilation)."""
        return abstract_batch(self._step_keys(), rows, length, targets, self.mesh,
                              self.model.config.embed_dim)

    def _batch_keys(self) -> tuple[str, ...]:
        return BATCH_KEYS + (("stream",) if self.first_layer else ())

    def _step_keys(self) -> tuple[str, ...]:
        # loss_scale, set by `put_batch`: per row (all equal), what the summed token loss is
        # multiplied by.
        return self._batch_keys() + ("loss_scale",)

    def put_batch(self, batch: dict, update_tokens: int | None = None) -> dict:
        """The global batch as sharded arrays. `update_tokens`: the target tokens of all the
        micro-batches of this batch's update together (default: this batch's own times
        accumulate_steps).

        With it, each micro-batch's gradient is its summed token loss times
        accumulate_steps / update_tokens, and the optimizer's mean over the micro-batches is
        the per-token mean of the whole update: long and short micro-batches weigh by their
        tokens, as one large batch would, not one mean per micro-batch.
        """
        if update_tokens is None:  # as if every micro-batch of the update held as many
            update_tokens = int(np.sum(batch["loss_valid"])) * self.accumulate_steps
        scale = self.accumulate_steps / max(update_tokens, 1)
        arrays = {k: batch[k] for k in self._batch_keys()}
        arrays["loss_scale"] = np.full(batch["tokens"].shape[:1], scale, np.float32)
        return shd.global_batch_to_arrays(arrays, shd.batch_sharding(self.mesh))
