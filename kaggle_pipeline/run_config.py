"""A run's settings: one TOML file of sections, command-line `section.key=value` overrides.

With no file at all, the defaults are the embedded main job: LoRA on Gemma 3 270M (the GGUF
from PyPI) for the AIFactory review-sentiment task, on the project's copy of the data.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

from kaggle_pipeline.errors import UserError
from kaggle_pipeline.model.lora import LoraConfig
from kaggle_pipeline.training.optimizer import OptimConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the file or the key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A checkpoint path (HF dir, .gguf, Orbax dir), "gemma3-270m-gguf" for the packaged model,
    # or "" to start from random weights of `preset` (tests, from-scratch runs).
    checkpoint: str = "gemma3-270m-gguf"
    preset: str = ""  # a config preset name; "" means read it from the checkpoint
    tokenizer: str = ""  # a SentencePiece .model; "" means next to / inside the checkpoint
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU)
    param_dtype: str = "float32"  # how the frozen base is stored in memory
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataSection:
    task: str = "tarr-sentiment"
    prompt: str = ""  # user-turn template with {column} placeholders; "" = the task's own
    train: str = "data/tarr/train.tsv"
    test: str = "data/tarr/test.tsv"
    validation_fraction: float = 1 / 3
    seq_len: int = 128  # packed row length
    batch_size: int = 4  # rows per step
    # "answer": every model turn; "label": for classification only the label word's tokens
    loss_on: str = "label"
    on_bad_row: str = "error"  # or "skip"
    pack: bool = True
    # Prompt tokens kept when scoring labels or generating: longer prompts lose their middle (the
    # label or answer part is never cut); summary.json counts them.
    max_prompt_len: int = 2048


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: int = 3
    seed: int = 0
    max_steps: int = 0  # stop after this many steps (0: all epochs)
    save_every: int = 50  # steps between checkpoints (also saved at each epoch end)
    keep: int = 2  # checkpoints kept
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_model: int = 1
    predict: bool = True  # after training: validation metrics, test predictions, submission


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str = "runs"
    name: str = "tarr-sentiment"
    submissions: str = "submissions"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10,
                                     weight_decay=0.0, clip_norm=1.0)
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser() / self.output.name


def resolve_input(path: str) -> Path:
    """An input path relative to the working directory if it exists there, else to the
    project checkout (so the embedded default data is found from anywhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (PROJECT_DIR / p).exists():
        return p
    return PROJECT_DIR / p


def _number(convert, value, where: str):
    try:
        return convert(value)
    except (TypeError, ValueError):
        kind = "an integer" if convert is int else "a number"
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def _coerce(value, annotation, where: str):
    kind = typing.get_origin(annotation) or annotation
    if annotation in ("float", float) or kind is float:
        return _number(float, value, where)
    if isinstance(value, str) and annotation in ("bool", bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, str) and annotation in ("int", int):
        return _number(int, value, where)
    if isinstance(value, str) and annotation in ("float | None", "int | None"):
        return None if value.lower() in ("none", "") else _number(float, value, where)
    if "tuple" in str(annotation):
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(i).strip() for i in items if str(i).strip())
    return value


def _section(cls, values: dict, name: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"config section [{name}]: unknown key(s) {sorted(unknown)}; "
                          f"known: {sorted(fields)}")
    values = {k: _coerce(v, fields[k].type, f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**values)
    except ValueError as err:  # the section's own checks (e.g. LoRA targets)
        raise ConfigError(f"[{name}]: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, dict] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        not_tables = sorted(name for name, values in raw.items() if not isinstance(values, dict))
        if not_tables:
            raise ConfigError(f"{path}: {not_tables} must be [section] tables of key = value")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, field = key.split(".", 1)
        raw.setdefault(section, {})[field] = value
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: "
                          f"{sorted(sections)}")
    default = RunConfig()
    built = {}
    for name in sections:
        current = getattr(default, name)
        merged = {**dataclasses.asdict(current), **raw.get(name, {})}
        built[name] = _section(type(current), merged, name)
    return RunConfig(**built)


def to_toml(cfg: RunConfig) -> str:
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            if value is None:  # TOML has no null; "none" reads back as None
                text = '"none"'
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            elif isinstance(value, (tuple, list)):
                text = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
