"""Getting a fine-tuned model out for other libraries: a PEFT adapter, or a merged checkpoint.

PEFT stores each adapted torch Linear (weight [out, in]) as lora_A.weight [r, in] and
lora_B.weight [out, r], with delta W = (alpha / r) · B · A, the same scale as ours. Our factors
keep the heads split out (model/lora.py): A is [in..., r] and B [r, out...], and the head axes
flatten head-major (n * H + h), the order the HF q/k/v/o projections use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from kaggle_pipeline.checkpoints.adapter import check_lora_tree
from kaggle_pipeline.files import atomic_directory
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.lora import TARGETS, LoraConfig, merge_lora

PEFT_PREFIX = "base_model.model."


def peft_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our (a [in..., r], b [r, out...]) of one projection -> PEFT's (lora_A.weight [r, in],
    lora_B.weight [out, r])."""
    rank = b.shape[0]
    return a.reshape(-1, rank).T, b.reshape(rank, -1).T


def export_peft_adapter(lora_tree: Mapping, lora_config: LoraConfig, model_config: ModelConfig,
                        out_dir: str | Path, base_model_name_or_path: str = "", *,
                        layers_prefix: str = "model.", dtype: jnp.dtype = jnp.float32) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel` loads
    onto the transformers model of `model_config`.

    `layers_prefix` is where the decoder layers sit in that model: "model." for
    Gemma*ForCausalLM, "model.language_model." for Gemma3ForConditionalGeneration (then the
    targets become a regex, so the vision tower's q_proj etc. are left alone).
    """
    check_lora_tree(lora_tree, lora_config, model_config)
    dtype = np.dtype(jnp.dtype(dtype))
    tensors = {}
    adapted = lora_config.layers(model_config.num_layers)
    for i in adapted:
        modules = lora_tree[f"layer_{i}"]
        for name in lora_config.targets:
            row = TARGETS[name]
            factors = modules[row.module][name]
            a = np.asarray(jax.device_get(factors["a"]), np.float32)
            b = np.asarray(jax.device_get(factors["b"]), np.float32)
            peft_a, peft_b = peft_factors(a, b)
            key = f"{PEFT_PREFIX}{layers_prefix}layers.{i}.{row.hf_module}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(peft_a, dtype)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(peft_b, dtype)

    modules = [TARGETS[t].hf_module.split(".")[1] for t in lora_config.targets]
    some_layers = len(adapted) < model_config.num_layers
    # PEFT honours layers_to_transform for a list of module names, not for a regex.
    listed = list(adapted) if some_layers and layers_prefix == "model." else None
    if layers_prefix == "model.":
        target_modules: list[str] | str = modules
    else:  # a regex, which names the layers itself
        numbers = "|".join(map(str, adapted)) if some_layers else r"\d+"
        target_modules = rf"{re.escape(layers_prefix)}layers\.({numbers})\.(self_attn|mlp)\." \
                         rf"({'|'.join(modules)})"
    alpha = lora_config.alpha
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None,
        "inference_mode": True,
        "r": lora_config.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": target_modules,
        "layers_to_transform": listed,
        "layers_pattern": "layers" if listed else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    return atomic_directory(Path(out_dir), fill)


def export_merged(params: Mapping, lora_tree: Mapping, model_config: ModelConfig,
                  lora_config: LoraConfig, out_dir: str | Path, fmt: str = "hf", *,
                  dtype: jnp.dtype = jnp.bfloat16) -> Path:
    """The adapted model as a plain checkpoint (adapter folded into the weights), in `dtype`
    (bfloat16, as the released checkpoints, unless told otherwise).

    fmt "hf": config.json + model.safetensors that transformers loads as *ForCausalLM.
    fmt "orbax": an official-layout Orbax checkpoint (what the Kaggle Flax models ship).
    """
    if fmt not in ("hf", "orbax"):
        raise ValueError(f"unknown export format {fmt!r}: expected 'hf' or 'orbax'")
    check_lora_tree(lora_tree, lora_config, model_config)
    # merge_lora updates with .at[]: host (numpy) params must become jax arrays first.
    params = jax.tree.map(jnp.asarray, params)
    merged = merge_lora(params, lora_tree, model_config, lora_config)
    if fmt == "hf":
        from kaggle_pipeline.checkpoints.hf_format import save_hf

        return Path(save_hf(merged, model_config, out_dir, dtype=dtype))
    from kaggle_pipeline.checkpoints.orbax_format import save_orbax

    return Path(save_orbax(merged, out_dir, dtype=dtype))
