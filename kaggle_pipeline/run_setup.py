"""What every command sets up from a run config: the task and its input files, the mesh, the base
model and its tokenizer, what a run is trained from (its identity) and what a finished run
trained. The stages below take sizes and settings; this is the one place that reads them out of
a `RunConfig`.

Checks that need no model come first: `read_test` and `check_inputs` read and validate the
test file and the sample submission, `check_tokenizer_alone` the tokenizer, all before a
weight is read; `check_tokenizer` then compares the tokenizer with the loaded model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from kaggle_pipeline import host_malloc
from kaggle_pipeline.checkpoints import load_checkpoint, read_config
from kaggle_pipeline.checkpoints.adapter import load_adapter
from kaggle_pipeline.checkpoints.common import CheckpointError
from kaggle_pipeline.cli import log
from kaggle_pipeline.data.tasks import Example, TaskSpec, build_examples, define_task, load_records
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.inference.sampler import SamplingConfig
from kaggle_pipeline.model import (
    Transformer,
    abstract_params,
    init_params,
    layer_stack,
    precision,
    sharding,
)
from kaggle_pipeline.model.config import ModelConfig, get_config, tiny_config
from kaggle_pipeline.model.lora import LoraConfig, init_lora
from kaggle_pipeline.run_config import ConfigError, ModelSection, RunConfig, resolve_input
from kaggle_pipeline.training import identity

PACKAGED_MODEL = "gemma3-270m-gguf"
MODEL_CONFIG_FILE = "model_config.json"  # beside a fully fine-tuned model/
# Generation defaults when [task] sets none.
MAX_NEW_TOKENS = 256  # long enough for a Dolly answer or a summary, short enough to not stall
VALIDATION_SIZE = 256  # generation validation decodes at most this many examples


class TrainedModelMissing(UserError):
    """The run directory holds no adapter (or full model) to predict with."""


class TokenizerError(UserError):
    """A tokenizer that is missing, unreadable or does not fit the model."""


class RunChanged(UserError):
    """A run directory whose checkpoints were trained from other data, model or settings."""


# ----------------------------------------------------------------------------- task and files

# [task] key -> TaskSpec field; the keys not here are for inference and evaluation.
_TASK_FIELDS = {"kind": "kind", "format": "format", "id_column": "id_column",
                "prompt": "prompt", "turns_column": "turns_column", "system": "system",
                "label_column": "label_column", "labels": "label_map", "answer": "answer",
                "source_language": "source_lang", "target_language": "target_lang",
                "metric": "metric", "submission_columns": "output_columns",
                "sample_submission": "sample_submission"}


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The task of a run: the preset data.task with the [task] keys set on top, or the [task]
    section alone. A task that cannot be built is a ConfigError naming the key."""
    fields = {field: getattr(cfg.task, key) for key, field in _TASK_FIELDS.items()
              if getattr(cfg.task, key) not in ("", (), None)}
    if cfg.data.prompt:
        fields.setdefault("prompt", cfg.data.prompt)
    if "sample_submission" in fields:
        fields["sample_submission"] = str(resolve_input(fields["sample_submission"]))
    try:
        spec = define_task(cfg.data.task or None, cfg.output.name, **fields)
    except ValueError as err:  # TemplateError, TaskSpec's own checks
        raise ConfigError(f"[task]: {err}") from None
    if cfg.task.decision == "threshold" and (spec.kind != "classification"
                                             or len(spec.label_map) != 2):
        raise ConfigError(f"task.decision = \"threshold\" needs a task with two labels; "
                          f"{spec.name!r} is {spec.kind}" + (
                              f" with {len(spec.label_map)} labels"
                              if spec.kind == "classification" else "")
                          + " (use \"argmax\" or leave it unset)")
    return spec


def sampling_config(cfg: RunConfig) -> SamplingConfig:
    """How generation decodes: the [task] keys, greedy with MAX_NEW_TOKENS by default."""
    t = cfg.task
    return SamplingConfig(max_new_tokens=t.max_new_tokens or MAX_NEW_TOKENS,
                          temperature=t.temperature or 0.0, top_k=t.top_k, top_p=t.top_p)


def validation_size(cfg: RunConfig, spec: TaskSpec) -> int | None:
    """How many validation examples are predicted: task.validation_size, else all for
    classification and VALIDATION_SIZE for generation (decoding is the slow part)."""
    if cfg.task.validation_size is not None:
        return cfg.task.validation_size
    return VALIDATION_SIZE if spec.kind == "generation" else None


def input_paths(spec: TaskSpec, value: str | Sequence[str], field: str = "data.train"
                ) -> Path | tuple[Path, ...]:
    """A data.train / data.test value as the task's reader takes it: one path, or as many as
    the reader reads (Dolly's English and Korean files), written "a.jsonl,b.jsonl" or as a
    TOML list. A test file may be fewer files when the reader says so (Dolly: the source
    language's file alone)."""
    from kaggle_pipeline.data.tasks import reader_of

    reader = reader_of(spec)
    counts = reader.counts(labelled=field != "data.test")
    parts = [value] if isinstance(value, str) else [str(v) for v in value]
    if reader.files > 1 and isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    if len(parts) not in counts or not all(parts):
        raise UserError(f"{field}: task {spec.name!r} reads {reader.describe_files()}; "
                        f"got {value!r}")
    paths = tuple(resolve_input(p) for p in parts)
    return paths[0] if len(paths) == 1 else paths


def read_labelled(cfg: RunConfig, spec: TaskSpec, field: str = "data.train"):
    """The records of a labelled file (data.train, data.validation) as a polars frame."""
    value = getattr(cfg.data, field.removeprefix("data."))
    log(f"reading {value}")
    table = load_records(spec, input_paths(spec, value, field), on_bad_row=cfg.data.on_bad_row)
    if table.skipped:
        log(table.report())
    return table.frame


def read_examples(cfg: RunConfig, spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples: all of data.train and data.validation's rows when that is
    set, else the same split of data.train for the same seed."""
    from kaggle_pipeline.data.tasks import train_validation_split

    frame = read_labelled(cfg, spec)
    if cfg.data.validation:
        train_frame, valid_frame = frame, read_labelled(cfg, spec, "data.validation")
    else:
        train_frame, valid_frame = train_validation_split(
            frame, validation_fraction=cfg.data.validation_fraction, seed=cfg.train.seed,
            stratify_by=spec.stratify_column)
    train_examples = build_examples(spec, train_frame)
    valid_examples = build_examples(spec, valid_frame)
    log(f"{len(train_examples)} training and {len(valid_examples)} validation examples")
    return train_examples, valid_examples


def read_test(cfg: RunConfig, spec: TaskSpec) -> list[Example]:
    """The test file's examples, checked against the sample submission, before any model is
    loaded. Every test row needs a prediction, so a row that cannot be read is an error even
    with data.on_bad_row = "skip"."""
    from kaggle_pipeline.data.records import DataError
    from kaggle_pipeline.submission import check_sample

    paths = input_paths(spec, cfg.data.test, "data.test")
    table = load_records(spec, paths, labelled=False, on_bad_row=cfg.data.on_bad_row)
    if table.skipped:
        raise DataError(f"{len(table.skipped)} test rows cannot be read and every test row "
                        f"needs a prediction; fix the file. The first: {table.skipped[0]}")
    examples = build_examples(spec, table.frame, with_answers=False)
    first = paths[0] if isinstance(paths, tuple) else paths
    check_sample(spec, first, [e.id for e in examples])
    return examples


# ----------------------------------------------------------------------------- model


def build_mesh(cfg: RunConfig, devices: list | None = None):
    """The run's (data, fsdp, model) mesh over `devices` (default: every device jax sees)."""
    try:
        return sharding.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp,
                                  cfg.train.mesh_model, devices=devices)
    except ValueError as err:
        raise ConfigError(f"train.mesh_data x mesh_fsdp x mesh_model = {cfg.train.mesh_data} x "
                          f"{cfg.train.mesh_fsdp} x {cfg.train.mesh_model}: {err}") from None


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


def check_adapted_layers(lora: LoraConfig, config: ModelConfig, section: ModelSection) -> None:
    """LoRA on some layers only cannot be scanned: the scanned layers share one LoRA shape."""
    if section.scan_layers and lora.enabled and lora.layers(config.num_layers).start > 0:
        raise ConfigError(f"lora.last_layers = {lora.last_layers} (LoRA on the last "
                          f"{lora.last_layers} of {config.num_layers} layers) needs "
                          "model.scan_layers = false: the scanned layers share one LoRA shape. "
                          "Set lora.last_layers = 0 to adapt every layer")


def abstract_variables(cfg: RunConfig, config: ModelConfig, mesh) -> tuple[dict, dict | None]:
    """(params, LoRA factors or None) of the run's model as shapes with their shardings on
    `mesh`, nothing allocated: the weights as `load_model` places them, the factors as
    `init_lora` and `place_lora` make them. For compiling ahead of time."""
    param_dtype = dtypes(cfg.model, mesh)[1]
    params = abstract_params(config, param_dtype, cfg.model.scan_layers)
    params = sharding.placed_shapes(params, sharding.param_shardings(
        params, mesh, config.transpose_gating_einsum))
    if not cfg.lora.enabled:
        return params, None
    lora = jax.eval_shape(lambda: place_lora(
        init_lora(config, cfg.lora, jax.random.key(0)), cfg.lora, config, cfg.model))
    return params, sharding.placed_shapes(lora, sharding.param_shardings(
        lora, mesh, config.transpose_gating_einsum))


def place_lora(lora_tree: dict, lora: LoraConfig, config: ModelConfig, section: ModelSection,
               mesh=None) -> dict:
    """A per-layer LoRA tree (init_lora, an adapter file, of `lora`'s layers) in the model's
    layout, on the mesh."""
    check_adapted_layers(lora, config, section)
    if section.scan_layers:
        lora_tree = layer_stack.stack(lora_tree, config)
    if mesh is None:
        return lora_tree
    return jax.device_put(lora_tree, sharding.param_shardings(
        lora_tree, mesh, config.transpose_gating_einsum))


def _preset(name: str) -> ModelConfig:
    try:
        if name.startswith("tiny-"):  # tiny-gemma2 / tiny-gemma3 with the real 262k vocabulary
            return tiny_config(name.removeprefix("tiny-"), vocab_size=262_144)
        return get_config(name)
    except ValueError as err:
        raise ConfigError(f"model.preset = {name!r}: {err}") from None


def checkpoint_path(section: ModelSection) -> Path | None:
    if not section.checkpoint:
        return None
    if section.checkpoint == PACKAGED_MODEL:
        from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

        return gemma3_270m_gguf()
    path = resolve_input(section.checkpoint)
    if not path.exists():
        raise CheckpointError(f"model.checkpoint: {path} does not exist")
    return path


def _tokenizer_source(section: ModelSection) -> tuple[str, Path]:
    """(what it is, the file): model.tokenizer, else next to / inside the checkpoint."""
    if section.tokenizer:
        return "model.tokenizer", resolve_input(section.tokenizer)
    path = checkpoint_path(section)
    if path is None:
        from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

        return "gguf", gemma3_270m_gguf()  # random-weight runs borrow Gemma 3's
    if path.suffix == ".gguf":
        return "gguf", path
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.exists():
            return "tokenizer.model", candidate
    raise TokenizerError(f"no tokenizer.model in or next to {path} (model.checkpoint); set "
                         "model.tokenizer to the model's tokenizer.model")


def tokenizer_file(section: ModelSection) -> Path:
    return _tokenizer_source(section)[1]


def load_tokenizer(section: ModelSection) -> Tokenizer:
    """The run's tokenizer; TokenizerError naming the file when it is missing or unreadable."""
    kind, path = _tokenizer_source(section)
    where = "model.tokenizer" if kind == "model.tokenizer" else "the tokenizer"
    try:
        if kind == "gguf":
            return Tokenizer.from_gguf(path)
        return Tokenizer.from_model_file(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise TokenizerError(f"{where}: {err}") from None


def check_tokenizer_alone(tokenizer: Tokenizer, style: str) -> None:
    """The special tokens the chat format needs, before any model is loaded."""
    names = ["bos", "eos"] + (["start_of_turn", "end_of_turn"] if style == "chat" else [])
    for name in names:
        try:
            getattr(tokenizer, f"{name}_id")
        except KeyError as err:
            raise TokenizerError(f"{tokenizer!r} has no {name} token ({err.args[0]}); it is "
                                 "not a Gemma tokenizer: set model.tokenizer to the model's "
                                 "tokenizer.model") from None


def check_tokenizer(tokenizer: Tokenizer, config: ModelConfig, style: str) -> None:
    """The tokenizer fits the model: every id it can produce has a row in the embedding.

    A checkpoint may have more rows than the tokenizer has pieces (Gemma 2's Orbax weights have
    256128 rows for 256000 pieces), never fewer; otherwise the ids index past the embedding
    and training learns noise (loss 17 instead of 5).
    """
    check_tokenizer_alone(tokenizer, style)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"{tokenizer!r} has {tokenizer.vocab_size} pieces but the model's "
                             f"embedding has {config.vocab_size} rows: not this model's "
                             "tokenizer; set model.tokenizer to the model's tokenizer.model")
    ids = {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    if style == "chat":
        ids |= {"<start_of_turn>": tokenizer.start_of_turn_id,
                "<end_of_turn>": tokenizer.end_of_turn_id}
    outside = {name: i for name, i in ids.items() if not 0 <= i < config.vocab_size}
    if outside:
        raise TokenizerError(f"{tokenizer!r}: token ids {outside} are outside the model's "
                             f"{config.vocab_size}-row embedding")


def model_config(section: ModelSection) -> ModelConfig:
    """The model's config without loading a weight: the preset, else the checkpoint's own."""
    if section.preset:
        return _preset(section.preset)
    path = checkpoint_path(section)
    if path is None:
        raise UserError("model.checkpoint is empty: set model.preset to start from random "
                        "weights")
    return read_config(path)


def load_model(section: ModelSection, *, seed: int = 0, mesh=None,
               config: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) in model.param_dtype and the model's layout (stacked with
    scan_layers); on `mesh`, every tensor is placed on its sharding as it is read. `config`:
    what `model_config` said, when the caller asked it first (the checkpoint's shapes are
    checked against it)."""
    dtype = dtypes(section, mesh)[1]
    if jax.default_backend() == "cpu":  # XLA:CPU's step time depends on it (host_malloc.py)
        log(f"host memory allocator: {host_malloc.describe()}")
    path = checkpoint_path(section)
    preset = config or (_preset(section.preset) if section.preset else None)
    if path is None:
        if preset is None:
            raise ConfigError("model.checkpoint is empty: set model.preset to start from random "
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


# ----------------------------------------------------------------------------- run identity

# The settings that change what training computes (not where files are, how often to save, nor
# how to predict); with the content of the files, a run's identity. [model]: every key but the
# two paths, whose files count by content.
_MODEL_PATHS = ("checkpoint", "tokenizer")
_TRAINING_KEYS = {
    "model": None,
    "data": ("task", "prompt", "validation_fraction", "seq_len", "batch_size", "loss_on",
             "on_bad_row", "pack"),
    "task": ("kind", "format", "id_column", "prompt", "turns_column", "system",
             "label_column", "labels", "answer", "source_language", "target_language"),
    "lora": None,  # every key
    "optim": None,
    "train": ("epochs", "seed"),
}


# Keys added after runs were saved, with the value those runs trained with: recorded only when
# set otherwise, so an older run's identity still matches.
_ADDED_KEYS = {"lora.last_layers": 0}

# What predicting compares with the run's identity: the LoRA settings and the task's
# conversations (batch sizes, dtypes and file formats may change for prediction).
_PREDICT_PREFIXES = ("lora.", "task.", "data.task", "data.prompt", "model.preset")
_PREDICT_FREE = {"task.format", "task.id_column", "lora.dropout"}


def run_identity(cfg: RunConfig, spec: TaskSpec, *, with_train: bool = True) -> dict:
    """What the run is trained from: the train file(s), the checkpoint and tokenizer files
    (by content) and the training settings."""
    settings = {}
    for section, keys in _TRAINING_KEYS.items():
        values = dataclasses.asdict(getattr(cfg, section))
        for key in keys or values:
            name = f"{section}.{key}"
            if (section != "model" or key not in _MODEL_PATHS) and \
                    _ADDED_KEYS.get(name, ...) != values[key]:
                settings[name] = values[key]
    train = input_paths(spec, cfg.data.train, "data.train") if with_train else ()
    train = (train,) if isinstance(train, Path) else train
    model = [p for p in (checkpoint_path(cfg.model), tokenizer_file(cfg.model)) if p is not None]
    return identity.identity(train, dict.fromkeys(model), settings)


def check_run_identity(cfg: RunConfig, spec: TaskSpec, *, has_checkpoint: bool) -> dict:
    """Refuse a run directory whose checkpoints come from other inputs; returns the current
    identity (the caller saves it). Without a checkpoint nothing is resumed: any identity
    goes."""
    current = run_identity(cfg, spec)
    saved = identity.load(cfg.run_dir)
    if has_checkpoint and saved is not None:
        changed = identity.differences(saved, current)
        if changed:
            raise RunChanged(f"{cfg.run_dir} holds checkpoints trained from other inputs: "
                             f"{'; '.join(changed)}. Train into another output.name, or delete "
                             f"{cfg.run_dir} to start over")
    elif has_checkpoint:
        log(f"warning: {cfg.run_dir} has checkpoints but no {identity.IDENTITY_FILE} (an older "
            "run); resuming without checking what it was trained from")
    return current


def check_trained_from(cfg: RunConfig, spec: TaskSpec) -> None:
    """Before predicting: the adapter was trained on this base checkpoint with these settings
    (the train files are not needed to predict and are not compared)."""
    saved = identity.load(cfg.run_dir)
    if saved is None:
        return
    current = run_identity(cfg, spec, with_train=False)

    def asked(value: dict) -> dict:
        """What the model is and how it is asked; not how to batch, train or read files."""
        settings = {k: v for k, v in value.get("settings", {}).items()
                    if k.startswith(_PREDICT_PREFIXES) and k not in _PREDICT_FREE}
        return {"model": value.get("model", {}), "settings": settings}

    changed = identity.differences(asked(saved), asked(current))
    if changed:
        raise RunChanged(f"{cfg.run_dir} was trained from other inputs: {'; '.join(changed)}. "
                         "Predict with the run's own config (its config.toml) or train again")


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


def load_trained(cfg: RunConfig, style: str = "chat", mesh=None
                 ) -> tuple[Transformer, dict, Tokenizer]:
    """(model, variables, tokenizer) of a finished run, its weights placed on `mesh` (default:
    the run's mesh); TrainedModelMissing or TokenizerError before any weight is read when the
    run saved nothing or the tokenizer is unusable."""
    mesh = build_mesh(cfg) if mesh is None else mesh
    if cfg.lora.enabled:
        model, variables, tokenizer = load_trained_adapters(cfg, [cfg], style, mesh)
        return model, variables[0], tokenizer
    trained = trained_path(cfg)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer_alone(tokenizer, style)
    log(f"loading the fine-tuned model {trained}")
    saved_config = load_model_config(cfg.run_dir / MODEL_CONFIG_FILE)
    config, params = load_checkpoint(trained, config=saved_config,
                                     dtype=dtypes(cfg.model, mesh)[1], mesh=mesh,
                                     scan_layers=cfg.model.scan_layers)
    return transformer(cfg.model, config, mesh), {"params": params}, tokenizer


def load_trained_adapters(cfg: RunConfig, runs: Sequence[RunConfig], style: str = "chat",
                          mesh=None) -> tuple[Transformer, list[dict], Tokenizer]:
    """The model and the variables of the adapters of `runs` (the folds of a cross-validation),
    all on cfg's base model, loaded once, on `mesh` (default: the run's mesh)."""
    mesh = build_mesh(cfg) if mesh is None else mesh
    trained = [trained_path(run) for run in runs]
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer_alone(tokenizer, style)
    log(f"loading {cfg.model.checkpoint or cfg.model.preset} and the adapter"
        f"{'s' if len(trained) > 1 else ''} {', '.join(map(str, trained))}")
    config, params = load_model(cfg.model, seed=cfg.train.seed, mesh=mesh)
    variables, scale = [], 1.0
    for path in trained:
        lora_tree, lora_cfg = load_adapter(path, config)
        variables.append({"params": params,
                          "lora": place_lora(lora_tree, lora_cfg, config, cfg.model, mesh)})
        scale = lora_cfg.scale
    return transformer(cfg.model, config, mesh, lora_scale=scale), variables, tokenizer


def save_model_config(config: ModelConfig, path: Path) -> None:
    """Our ModelConfig as JSON, so a fully fine-tuned model of any shape loads again (its
    shapes need not be those of a known preset, e.g. Gemma 2 from Hugging Face: 256000 rows)."""
    from kaggle_pipeline.files import write_text_atomically

    values = dataclasses.asdict(config)
    values["attention_kinds"] = [kind.value for kind in config.attention_kinds]
    write_text_atomically(path, json.dumps(values, indent=2) + "\n")


def load_model_config(path: Path) -> ModelConfig | None:
    """The ModelConfig `save_model_config` wrote; None when there is no such file."""
    from kaggle_pipeline.model.config import AttentionKind

    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        values["attention_kinds"] = tuple(AttentionKind(k) for k in values["attention_kinds"])
        return ModelConfig(**values)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a model config written by training ({err})") \
            from None


def decision(cfg: RunConfig) -> str:
    """How a two-label task decides: "argmax" (the default) or "threshold"."""
    return cfg.task.decision or "argmax"


def saved_threshold(cfg: RunConfig) -> float | None:
    """The binary decision threshold: 0 for argmax; for task.decision = "threshold" the one
    calibrated by the training run (on validation, or on the out-of-fold scores), None when the
    run wrote no summary (it stopped before validating)."""
    from kaggle_pipeline.files import read_json_object

    if decision(cfg) == "argmax":
        return 0.0
    values = read_json_object(cfg.run_dir / "summary.json") or {}
    validation = values.get("validation")
    if not isinstance(validation, dict):
        return None
    threshold = validation.get("calibrated_threshold", validation.get("threshold"))
    return float(threshold) if isinstance(threshold, (int, float)) else None
