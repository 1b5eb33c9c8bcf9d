"""Loading Gemma weights from Hugging Face, GGUF or Orbax checkpoints into the official layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp

from kaggle_pipeline.checkpoints.common import CheckpointError
from kaggle_pipeline.checkpoints.gguf_format import load_gguf
from kaggle_pipeline.checkpoints.hf_format import load_hf, save_hf
from kaggle_pipeline.model.config import ModelConfig

ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "manifest.ocdbt")


def _looks_like_orbax(directory: Path) -> bool:
    """Markers in the directory or one level down (Kaggle's <dir>/gemma2-2b-it/, Orbax's default/);
    orbax_format.find_checkpoint_dir picks the exact one."""
    dirs = [directory, *(p for p in directory.iterdir() if p.is_dir())]
    return any((d / marker).exists() for d in dirs for marker in ORBAX_MARKERS)


def load_checkpoint(path: str | Path, *, config: ModelConfig | None = None,
                    dtype: jnp.dtype = jnp.float32, shardings: Mapping | None = None,
                    mesh=None, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """(config, params) from whatever `path` holds, detected by its contents:

    a directory with config.json (Hugging Face), a .gguf file, or an Orbax directory.
    `config` overrides the one the checkpoint describes (Orbax ones infer it from shapes).
    On `mesh` every tensor goes straight to its sharding; `scan_layers` stacks the layers
    (`common.build_params`).
    """
    placement = dict(mesh=mesh, scan_layers=scan_layers)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype, shardings, config=config, **placement)
        raise CheckpointError(f"{path}: unknown checkpoint file (expected a .gguf file or a "
                              "Hugging Face / Orbax directory)")
    if (path / "config.json").exists():
        return load_hf(path, config, dtype, shardings, **placement)
    if _looks_like_orbax(path):
        from kaggle_pipeline.checkpoints.orbax_format import load_orbax

        return load_orbax(path, config, dtype, shardings, **placement)
    raise CheckpointError(f"{path}: not a checkpoint directory (no config.json for Hugging Face, "
                          f"none of {', '.join(ORBAX_MARKERS)} here or in a subdirectory for "
                          "Orbax)")


def read_config(path: str | Path) -> ModelConfig:
    """The model config a checkpoint describes, from its metadata only (no weight is read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        from kaggle_pipeline.checkpoints.gguf_format import config_from_gguf, read_gguf_header

        return config_from_gguf(read_gguf_header(path), str(path))
    if path.is_dir() and (path / "config.json").exists():
        import json

        from kaggle_pipeline.checkpoints.hf_format import config_from_hf

        try:
            return config_from_hf(json.loads((path / "config.json").read_text()),
                                  str(path / "config.json"))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({err})") from None
    if path.is_dir() and _looks_like_orbax(path):
        from kaggle_pipeline.checkpoints import orbax_format as ob

        ckpt_dir = ob.find_checkpoint_dir(path)
        entries = ob.catalog(ob.read_metadata(ckpt_dir), str(ckpt_dir))
        return ob.infer_config({k: e.shape for k, e in entries.items()}, str(ckpt_dir))
    raise CheckpointError(f"{path}: not a checkpoint (a .gguf file, a Hugging Face directory "
                          "with config.json, or an Orbax directory)")


__all__ = ["CheckpointError", "load_checkpoint", "load_gguf", "load_hf", "read_config",
           "save_hf"]
