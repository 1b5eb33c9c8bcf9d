"""The frozen layers below the first adapted one, computed once per run instead of every step.

With LoRA on the last N layers only (`lora.last_layers`), the layers below take no gradient,
and they see the same rows in every epoch: packing runs once, epochs only reorder the rows. So
the residual stream entering the first adapted layer is a fixed function of each row. It is
computed here once, in forward-only batches, kept on the host beside the row's tokens, and each
step starts from it (`Trainer.first_layer`). With LoRA on the last 9 of the 270M's 18 layers
(the main job), a step runs 9 layers forward and back instead of 18 forward and 9 back: 1.3 s
instead of 1.7 s on 2 CPU cores (BENCHMARKS.md §5).

It applies to LoRA runs with some layers frozen, on one process, when the streams fit
`HOST_BUDGET_BYTES`; otherwise the step runs every layer as before, with the same result up to
rounding (the streams are the same computation, compiled into another program).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from kaggle_pipeline.data.packing import batches
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.model import sharding as shd
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.lora import LoraConfig
from kaggle_pipeline.training.step import abstract_batch

# Rows x seq_len x embed_dim x 4 bytes kept on the host; past this the step runs every layer.
HOST_BUDGET_BYTES = 2 << 30
ROW_KEYS = ("tokens", "positions", "segment_ids")


def first_layer(lora: LoraConfig, config: ModelConfig, *, scan_layers: bool = False) -> int:
    """The first adapted layer when the layers below it can be computed once (0: they cannot,
    or there are none)."""
    if not lora.enabled or not lora.last_layers or scan_layers or jax.process_count() > 1:
        return 0
    return lora.layers(config.num_layers).start


def stream_bytes(rows: Sequence[dict], config: ModelConfig) -> int:
    """Host memory the rows' streams take (f32)."""
    return sum(row["tokens"].size for row in rows) * config.embed_dim * 4


def below_fn(model: Transformer, layer: int):
    """The jitted program of the frozen layers: (params, tokens, positions, segment_ids) ->
    the residual stream entering `layer` [B, T, D] f32."""

    @jax.jit
    def below(params, tokens, positions, segment_ids):
        return model.apply({"params": params}, tokens, positions, segment_ids,
                           stop_before=layer)

    return below


def abstract_rows(rows: int, length: int, mesh: Mesh) -> tuple:
    """The row arguments of `below_fn`'s program, as shapes and shardings only."""
    return tuple(abstract_batch(ROW_KEYS, rows, length, 0, mesh).values())


def row_streams(below, params: dict, rows: Sequence[dict], batch_size: int, mesh: Mesh
                ) -> np.ndarray:
    """[rows, T, D] f32: the residual stream of each row entering the layer of `below`
    (`below_fn`), computed in batches of `batch_size` rows (the last one padded with empty
    rows) on `mesh`."""
    out = []
    for batch in batches(list(rows), batch_size, seed=0, epoch=0, shuffle=False):
        placed = shd.global_batch_to_arrays({k: batch[k] for k in ROW_KEYS},
                                            shd.batch_sharding(mesh))
        out.append(np.asarray(jax.device_get(below(params, *(placed[k] for k in ROW_KEYS)))))
    return np.concatenate(out)[:len(rows)]
