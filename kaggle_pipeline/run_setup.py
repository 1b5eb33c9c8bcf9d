"""What every command sets up from a run config: the task and its input files, the mesh, the base
model and its tokenizer, and what a finished run trained. The stages below take sizes and
settings; this is the one place that reads them out of a `RunConfig`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from kaggle_pipeline.checkpoints import load_checkpoint, read_config
from kaggle_pipeline.checkpoints.adapter import load_adapter
from kaggle_pipeline.cli import log
from kaggle_pipeline.data.tasks import TaskSpec, get_task
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.model import Transformer, init_params, layer_stack, precision, sharding
from kaggle_pipeline.model.config import ModelConfig, get_config, tiny_config
from kaggle_pipeline.run_config import ModelSection, RunConfig, resolve_input

PACKAGED_MODEL = "gemma3-270m-gguf"


class TrainedModelMissing(UserError):
    """The run directory holds no adapter (or full model) to predict with."""


# ----------------------------------------------------------------------------- task and files


def task_spec(cfg: RunConfig) -> TaskSpec:
    options = {"prompt": cfg.data.prompt} if cfg.data.prompt else {}
    return get_task(cfg.data.task, **options)


def input_paths(spec: TaskSpec, value: str | Sequence[str], field: str = "data.train"
                ) -> Path | tuple[Path, ...]:
    """A data.train / data.test value as the task's reader takes it: one path, or as many as
    the reader reads (Dolly's English and Korean files), written "a.jsonl,b.jsonl" or as a
    TOML list."""
    from kaggle_pipeline.data.tasks import reader_of

    reader = reader_of(spec)
    parts = [value] if isinstance(value, str) else [str(v) for v in value]
    if reader.files > 1 and isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    if len(parts) != reader.files or not all(parts):
        raise UserError(f"{field}: task {spec.name!r} reads {reader.describe_files()}; "
                        f"got {value!r}")
    paths = tuple(resolve_input(p) for p in parts)
    return paths[0] if reader.files == 1 else paths


# ----------------------------------------------------------------------------- model


def build_mesh(cfg: RunConfig, devices: list | None = None):
    """The run's (data, fsdp, model) mesh over `devices` (default: every device jax sees)."""
    try:
        return sharding.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp,
                                  cfg.train.mesh_model, devices=devices)
    except ValueError as err:
        raise UserError(f"train.mesh_data / mesh_fsdp / mesh_model: {err}") from None


def platform(mesh) -> str:
    return mesh.devices.flat[0].platform


def dtypes(section: ModelSection, mesh=None) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, param dtype) of model.dtype / model.param_dtype on the mesh's devices."""
    where = platform(mesh) if mesh is not None else None
    return precision.resolve(section.dtype, where), precision.resolve(section.param_dtype, where)


def transformer(section: ModelSection, config: ModelConfig, mesh=None, **settings
                ) -> Transformer:
    """The model of the run's [model] settings; `settings`: lora_scale, lora_dropout,
    deterministic."""
    return Transformer(config, dtype=dtypes(section, mesh)[0], remat=section.remat,
                       remat_policy=section.remat_policy, scan_layers=section.scan_layers,
                       attention_chunk=section.attention_chunk, **settings)


def place_lora(lora_tree: dict, config: ModelConfig, section: ModelSection, mesh=None) -> dict:
    """A per-layer LoRA tree (init_lora, an adapter file) in the model's layout, on the mesh."""
    if section.scan_layers:
        lora_tree = layer_stack.stack(lora_tree, config)
    if mesh is None:
        return lora_tree
    return jax.device_put(lora_tree, sharding.param_shardings(
        lora_tree, mesh, config.transpose_gating_einsum))


def _preset(name: str) -> ModelConfig:
    if name.startswith("tiny-"):  # tiny-gemma2 / tiny-gemma3 with the real 262k vocabulary
        return tiny_config(name.removeprefix("tiny-"), vocab_size=262_144)
    return get_config(name)


def checkpoint_path(section: ModelSection) -> Path | None:
    if not section.checkpoint:
        return None
    if section.checkpoint == PACKAGED_MODEL:
        from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

        return gemma3_270m_gguf()
    return resolve_input(section.checkpoint)


def load_tokenizer(section: ModelSection) -> Tokenizer:
    if section.tokenizer:
        return Tokenizer.from_model_file(resolve_input(section.tokenizer))
    path = checkpoint_path(section)
    if path is None:
        from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

        return Tokenizer.from_gguf(gemma3_270m_gguf())  # random-weight runs borrow Gemma 3's
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.exists():
            return Tokenizer.from_model_file(candidate)
    raise FileNotFoundError(f"no tokenizer.model in or next to {path}; set model.tokenizer")


def model_config(section: ModelSection) -> ModelConfig:
    """The model's config without loading a weight: the preset, else the checkpoint's own."""
    if section.preset:
        return _preset(section.preset)
    path = checkpoint_path(section)
    if path is None:
        raise UserError("model.checkpoint is empty: set model.preset to start from random "
                        "weights")
    return read_config(path)


def load_model(section: ModelSection, *, seed: int = 0, mesh=None) -> tuple[ModelConfig, dict]:
    """(config, params) in model.param_dtype and the model's layout (stacked with
    scan_layers); on `mesh`, every tensor is placed on its sharding as it is read."""
    dtype = dtypes(section, mesh)[1]
    path = checkpoint_path(section)
    preset = _preset(section.preset) if section.preset else None
    if path is None:
        if preset is None:
            raise ValueError("model.checkpoint is empty: set model.preset to start from random "
                             "weights")
        def init():
            return init_params(preset, jax.random.key(seed), dtype, section.scan_layers)

        if mesh is None:
            return preset, init()
        # Made on the mesh, each device only its shards (a 9B would not fit one TPU core).
        shardings = sharding.param_shardings(jax.eval_shape(init), mesh,
                                             preset.transpose_gating_einsum)
        return preset, jax.jit(init, out_shardings=shardings)()
    return load_checkpoint(path, config=preset, dtype=dtype, mesh=mesh,
                           scan_layers=section.scan_layers)


# ----------------------------------------------------------------------------- a finished run


def trained_path(cfg: RunConfig) -> Path:
    """What the run saved: the adapter directory, or the full model after full fine-tuning."""
    run_dir = cfg.run_dir
    if cfg.lora.enabled:
        adapter = run_dir / "adapter"
        if not (adapter / "lora_config.json").is_file():
            raise TrainedModelMissing(
                f"{adapter}: no trained adapter (lora_config.json missing); train first with "
                "`python -m kaggle_pipeline.train` and the same config, or point "
                "output.dir / output.name at the run")
        return adapter
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise TrainedModelMissing(
            f"{model_dir}: no fine-tuned model (lora.enabled = false); train first with "
            "`python -m kaggle_pipeline.train` and the same config")
    return model_dir


def load_trained(cfg: RunConfig, mesh=None) -> tuple[Transformer, dict, Tokenizer]:
    """(model, variables, tokenizer) of a finished run, its weights placed on `mesh` (default:
    the run's mesh); TrainedModelMissing before any weight is read when the run saved
    nothing."""
    trained = trained_path(cfg)
    tokenizer = load_tokenizer(cfg.model)
    mesh = build_mesh(cfg) if mesh is None else mesh
    if cfg.lora.enabled:
        log(f"loading {cfg.model.checkpoint or cfg.model.preset} and the adapter {trained}")
        config, params = load_model(cfg.model, seed=cfg.train.seed, mesh=mesh)
        lora_tree, lora_cfg = load_adapter(trained, config)
        model = transformer(cfg.model, config, mesh, lora_scale=lora_cfg.scale)
        lora_tree = place_lora(lora_tree, config, cfg.model, mesh)
        return model, {"params": params, "lora": lora_tree}, tokenizer
    log(f"loading the fine-tuned model {trained}")
    config, params = load_model(dataclasses.replace(cfg.model, checkpoint=str(trained)),
                                mesh=mesh)
    return transformer(cfg.model, config, mesh), {"params": params}, tokenizer


def saved_threshold(cfg: RunConfig) -> float:
    """The binary decision threshold calibrated on validation by the training run."""
    summary = cfg.run_dir / "summary.json"
    if not summary.exists():
        return 0.0
    return float(json.loads(summary.read_text(encoding="utf-8"))
                 .get("validation", {}).get("threshold", 0.0))
