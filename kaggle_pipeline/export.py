"""Getting a fine-tuned model out: a PEFT adapter, a merged checkpoint, or our own adapter.

PEFT stores each adapted torch Linear (weight [out, in]) as lora_A.weight [r, in] and
lora_B.weight [out, r], with delta W = (alpha / r) · B · A, the same scale as ours. Our factors
keep the heads split out (lora.py); the head axis flattens head-major (n * H + h), the order
the HF q/k/v/o projections use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kaggle_pipeline.checkpoints.common import flatten, unflatten
from kaggle_pipeline.config import ModelConfig
from kaggle_pipeline.lora import (
    ATTENTION_TARGETS,
    MLP_TARGETS,
    LoraConfig,
    factor_shapes,
    merge_lora,
)

# Our target name -> the HF module it adapts (inside a decoder layer).
HF_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
PEFT_PREFIX = "base_model.model."
ADAPTER_FORMAT = "kaggle_pipeline.lora_adapter"
ADAPTER_VERSION = "1"


def _module_of(target: str) -> str:
    return "attn" if target in ATTENTION_TARGETS else "mlp"


def _check_lora_tree(lora_tree: Mapping, lora_config: LoraConfig, model_config: ModelConfig,
                     ) -> None:
    """Every layer holds exactly the configured targets, each factor of the expected shape."""
    layers = []
    for layer_name, modules in lora_tree.items():
        match = re.fullmatch(r"layer_(\d+)", layer_name)
        if match is None or int(match[1]) >= model_config.num_layers:
            raise ValueError(f"LoRA tree: '{layer_name}' is not a layer of a "
                             f"{model_config.num_layers}-layer model")
        layers.append(int(match[1]))
        found = {t for targets in modules.values() for t in targets}
        if found != set(lora_config.targets):
            raise ValueError(f"LoRA tree: {layer_name} adapts {sorted(found)}, the LoRA config "
                             f"targets {sorted(lora_config.targets)}")
        for target in lora_config.targets:
            factors = modules.get(_module_of(target), {}).get(target, {})
            for name, shape in zip(("a", "b"), factor_shapes(model_config, target,
                                                             lora_config.rank), strict=True):
                got = getattr(factors.get(name), "shape", None)
                if got is None or tuple(got) != shape:
                    raise ValueError(f"LoRA tree: {layer_name}/{_module_of(target)}/{target}/"
                                     f"{name} has shape {got}, expected {shape}")
    missing = sorted(set(range(model_config.num_layers)) - set(layers))
    if missing:
        # init_lora adapts every layer; exports assume it (PEFT adapts every matching layer).
        raise ValueError(f"LoRA tree: no factors for layers {missing} of the "
                         f"{model_config.num_layers}-layer model")


def peft_factors(target: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our (a, b) of one projection -> PEFT's (lora_A.weight [r, in], lora_B.weight [out, r])."""
    rank = b.shape[0]
    if target in ("q", "k", "v"):  # a [D, r], b [r, N, H]; HF out index = n * H + h
        return a.T, b.reshape(rank, -1).T
    if target == "o":  # a [N, H, r], b [r, D]; HF in index = n * H + h
        return a.reshape(-1, rank).T, b.T
    return a.T, b.T  # gate, up: a [D, r] b [r, F]; down: a [F, r] b [r, D]


def _atomic_directory(out_dir: Path, fill) -> Path:
    """Fills a temp dir next to out_dir, then renames it into place (replacing any old one)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old = None
    try:
        fill(tmp)
        if out_dir.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_peft_adapter(lora_tree: Mapping, lora_config: LoraConfig, model_config: ModelConfig,
                        out_dir: str | Path, base_model_name_or_path: str = "", *,
                        layers_prefix: str = "model.", dtype: jnp.dtype = jnp.float32) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel` loads
    onto the transformers model of `model_config`.

    `layers_prefix` is where the decoder layers sit in that model: "model." for
    Gemma*ForCausalLM, "model.language_model." for Gemma3ForConditionalGeneration (then the
    targets become a regex, so the vision tower's q_proj etc. are left alone).
    """
    _check_lora_tree(lora_tree, lora_config, model_config)
    dtype = np.dtype(jnp.dtype(dtype))
    tensors = {}
    for i in range(model_config.num_layers):
        modules = lora_tree[f"layer_{i}"]
        for target in lora_config.targets:
            factors = modules[_module_of(target)][target]
            a = np.asarray(jax.device_get(factors["a"]), np.float32)
            b = np.asarray(jax.device_get(factors["b"]), np.float32)
            peft_a, peft_b = peft_factors(target, a, b)
            key = f"{PEFT_PREFIX}{layers_prefix}layers.{i}.{HF_MODULES[target]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(peft_a, dtype)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(peft_b, dtype)

    modules = [HF_MODULES[t].split(".")[1] for t in lora_config.targets]
    if layers_prefix == "model.":
        target_modules: list[str] | str = modules
    else:
        target_modules = rf"{re.escape(layers_prefix)}layers\.\d+\.(self_attn|mlp)\." \
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
        "layers_to_transform": None,
        "layers_pattern": None,
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

    return _atomic_directory(Path(out_dir), fill)


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
    _check_lora_tree(lora_tree, lora_config, model_config)
    # merge_lora updates with .at[]: host (numpy) params must become jax arrays first.
    params = jax.tree.map(jnp.asarray, params)
    merged = merge_lora(params, lora_tree, model_config, lora_config)
    if fmt == "hf":
        from kaggle_pipeline.checkpoints.hf_format import save_hf

        return Path(save_hf(merged, model_config, out_dir, dtype=dtype))
    from kaggle_pipeline.checkpoints.orbax_format import save_orbax

    return Path(save_orbax(merged, out_dir, dtype=dtype))


# --- our own adapter: a directory with the factors (safetensors) and the LoRA config (JSON) ---

ADAPTER_TENSORS = "lora.safetensors"
ADAPTER_CONFIG = "lora_config.json"


def save_adapter(lora_tree: Mapping, lora_config: LoraConfig, path: str | Path) -> Path:
    """Writes directory `path`: lora.safetensors (flattened 'layer_0/attn/q/a' keys, each factor
    in its own dtype) + lora_config.json; atomically, replacing an older adapter there."""
    tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flatten(lora_tree).items()}
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
              "rank": lora_config.rank, "alpha": lora_config.alpha,
              "dropout": lora_config.dropout, "targets": list(lora_config.targets)}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / ADAPTER_TENSORS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return _atomic_directory(Path(path), fill)


def _read_lora_config(file: Path) -> LoraConfig:
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{file}: field 'format' is {raw.get('format')!r}, expected "
                         f"{ADAPTER_FORMAT!r} (not an adapter written by save_adapter)")
    if raw.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{file}: field 'version' is {raw.get('version')!r}, this code reads "
                         f"version {ADAPTER_VERSION!r}")
    kinds = {"rank": int, "alpha": float, "dropout": float, "targets": tuple}
    values = {}
    for name, kind in kinds.items():
        if name not in raw:
            raise ValueError(f"{file}: field '{name}' is missing")
        value = raw[name]
        ok = (isinstance(value, list) and all(isinstance(t, str) for t in value)
              if kind is tuple else
              isinstance(value, int if kind is int else (int, float))
              and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{file}: field '{name}' = {value!r} is not "
                             f"{'a list of names' if kind is tuple else kind.__name__}")
        values[name] = kind(value)
    try:
        return LoraConfig(**values)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def load_adapter(path: str | Path, model_config: ModelConfig | None = None,
                 ) -> tuple[dict, LoraConfig]:
    """(lora_tree, lora_config) from a directory written by save_adapter; with `model_config`,
    the factor shapes are also checked against the model."""
    path = Path(path)
    tensors_file, config_file = path / ADAPTER_TENSORS, path / ADAPTER_CONFIG
    for file in (tensors_file, config_file):
        if not file.is_file():
            raise FileNotFoundError(f"adapter file not found: {file}")
    lora_config = _read_lora_config(config_file)
    try:
        with safe_open(tensors_file, framework="numpy") as f:
            flat = {key: jnp.asarray(f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{tensors_file}: not a readable safetensors file ({err})") from None
    allowed = "|".join(ATTENTION_TARGETS + MLP_TARGETS)
    for key in flat:
        if not re.fullmatch(rf"layer_\d+/(attn|mlp)/({allowed})/(a|b)", key):
            raise ValueError(f"{tensors_file}: tensor '{key}' is not a LoRA factor "
                             "('layer_<i>/<attn|mlp>/<target>/<a|b>')")
    tree = unflatten(flat)
    if model_config is not None:
        try:
            _check_lora_tree(tree, lora_config, model_config)
        except ValueError as err:
            raise ValueError(f"{tensors_file}: {err}") from None
    return tree, lora_config
