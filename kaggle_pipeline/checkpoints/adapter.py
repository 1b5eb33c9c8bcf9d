"""Our own adapter files: a directory with the LoRA factors (safetensors, no pickle) and the
LoRA config (JSON), written atomically; read back with every factor checked against the model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kaggle_pipeline.checkpoints.common import CheckpointError, flatten, unflatten
from kaggle_pipeline.files import atomic_directory
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.lora import TARGETS, LoraConfig

ADAPTER_FORMAT = "kaggle_pipeline.lora_adapter"
ADAPTER_VERSION = "1"
ADAPTER_TENSORS = "lora.safetensors"
ADAPTER_CONFIG = "lora_config.json"


def check_lora_tree(lora_tree: Mapping, lora_config: LoraConfig, model_config: ModelConfig,
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
        for name in lora_config.targets:
            module = TARGETS[name].module
            factors = modules.get(module, {}).get(name, {})
            shapes = TARGETS[name].factor_shapes(model_config, lora_config.rank)
            for which, shape in zip(("a", "b"), shapes, strict=True):
                got = getattr(factors.get(which), "shape", None)
                if got is None or tuple(got) != shape:
                    raise ValueError(f"LoRA tree: {layer_name}/{module}/{name}/{which} has shape "
                                     f"{got}, expected {shape}")
    expected = set(lora_config.layers(model_config.num_layers))
    missing = sorted(expected - set(layers))
    if missing:
        raise ValueError(f"LoRA tree: no factors for layers {missing} of the "
                         f"{model_config.num_layers}-layer model")
    extra = sorted(set(layers) - expected)
    if extra:
        raise ValueError(f"LoRA tree: factors for layers {extra}, but the LoRA config adapts "
                         f"the last {lora_config.last_layers} layers only")


def save_adapter(lora_tree: Mapping, lora_config: LoraConfig, path: str | Path) -> Path:
    """Writes directory `path`: lora.safetensors (flattened 'layer_0/attn/q/a' keys, each factor
    in its own dtype) + lora_config.json; atomically, replacing an older adapter there."""
    tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flatten(lora_tree).items()}
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
              "rank": lora_config.rank, "alpha": lora_config.alpha,
              "dropout": lora_config.dropout, "targets": list(lora_config.targets),
              "last_layers": lora_config.last_layers}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / ADAPTER_TENSORS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_directory(Path(path), fill)


def _read_lora_config(file: Path) -> LoraConfig:
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{file}: field 'format' is {raw.get('format')!r}, expected "
                              f"{ADAPTER_FORMAT!r} (not an adapter written by save_adapter)")
    if raw.get("version") != ADAPTER_VERSION:
        raise CheckpointError(f"{file}: field 'version' is {raw.get('version')!r}, this code "
                              f"reads version {ADAPTER_VERSION!r}")
    kinds = {"rank": int, "alpha": float, "dropout": float, "targets": tuple}
    values = {}
    for name, kind in kinds.items():
        if name not in raw:
            raise CheckpointError(f"{file}: field '{name}' is missing")
        value = raw[name]
        ok = (isinstance(value, list) and all(isinstance(t, str) for t in value)
              if kind is tuple else
              isinstance(value, int if kind is int else (int, float))
              and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{file}: field '{name}' = {value!r} is not "
                                  f"{'a list of names' if kind is tuple else kind.__name__}")
        values[name] = kind(value)
    # Absent in adapters written before it existed: every layer adapted.
    last = raw.get("last_layers", 0)
    if not isinstance(last, int) or isinstance(last, bool) or last < 0:
        raise CheckpointError(f"{file}: field 'last_layers' = {last!r} is not a count of "
                              "layers (0: every layer)")
    values["last_layers"] = last
    try:
        return LoraConfig(**values)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None


def load_adapter(path: str | Path, model_config: ModelConfig | None = None,
                 ) -> tuple[dict, LoraConfig]:
    """(lora_tree, lora_config) from a directory written by save_adapter; with `model_config`,
    the factor shapes are also checked against the model."""
    path = Path(path)
    tensors_file, config_file = path / ADAPTER_TENSORS, path / ADAPTER_CONFIG
    for file in (tensors_file, config_file):
        if not file.is_file():
            raise CheckpointError(f"adapter file not found: {file}")
    lora_config = _read_lora_config(config_file)
    try:
        with safe_open(tensors_file, framework="numpy") as f:
            flat = {key: jnp.asarray(f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{tensors_file}: not a readable safetensors file ({err})") from None
    allowed = "|".join(TARGETS)
    for key in flat:
        if not re.fullmatch(rf"layer_\d+/(attn|mlp)/({allowed})/(a|b)", key):
            raise CheckpointError(f"{tensors_file}: tensor '{key}' is not a LoRA factor "
                                  "('layer_<i>/<attn|mlp>/<target>/<a|b>')")
    tree = unflatten(flat)
    if model_config is not None:
        try:
            check_lora_tree(tree, lora_config, model_config)
        except ValueError as err:
            raise CheckpointError(f"{tensors_file}: {err}") from None
    return tree, lora_config
