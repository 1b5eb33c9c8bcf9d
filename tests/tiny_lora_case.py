"""The tiny LoRA training case the sharding and multi-process tests run in subprocesses, so
every run trains the same model on the same batches."""

import jax
import numpy as np

from kaggle_pipeline.data.packing import batches, pack
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig, init_lora
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row


def tiny_lora_case():
    """(config, params, lora_config, lora, three packed batches of 8 rows)."""
    # Gemma 2 2B's head layout: 8 query heads, 4 kv heads (not divisible by model=8).
    config = tiny_config("gemma2", num_layers=2, sliding_window=4, num_heads=8, num_kv_heads=4)
    rng = np.random.default_rng(0)
    # Host (numpy) trees: every run copies them to its devices, nothing is donated twice.
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32),
                          abstract_params(config))
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=ATTENTION_TARGETS + MLP_TARGETS)
    lora = jax.device_get(init_lora(config, lora_config, jax.random.key(1)))
    examples = []
    for _ in range(48):
        n = int(rng.integers(5, 20))
        examples.append((rng.integers(1, config.vocab_size, n), np.arange(n) >= n // 2))
    rows, _ = pack(examples, 32)
    max_targets = max_targets_per_row(rows)
    steps = [add_target_slots(b, max_targets) for b in batches(rows, 8, seed=0, epoch=0)][:3]
    assert len(steps) == 3
    return config, params, lora_config, lora, steps
