"""A run's settings: one TOML file of sections, command-line `section.key=value` overrides.

With no file at all, the defaults are the embedded main job: LoRA on Gemma 3 270M (the GGUF
from PyPI) for the AIFactory review-sentiment task, on the project's copy of the data.

Every numeric setting has its allowed range (`RANGES`) and every named choice its allowed values
(`CHOICES`), checked when the config is loaded: a bad value is a `ConfigError` naming the key
before any file or model is read.

`[task]` defines the task: on top of the preset `data.task` names (each key set replaces the
preset's value), or on its own when it sets `kind` (then `data.task` is "" and the files are read
by the generic table reader). Unset keys ("" / no value) keep the preset's or the generic default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from kaggle_pipeline.data.records import FORMATS
from kaggle_pipeline.data.tasks import LANGUAGES, METRICS, TASK_NAMES
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.model.lora import LoraConfig
from kaggle_pipeline.training.optimizer import OptimConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent
DTYPES = ("auto", "float32", "bfloat16")
REMAT_POLICIES = ("full", "dots")  # model/transformer.py REMAT_POLICIES


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the file or the key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A checkpoint path (HF dir, .gguf, Orbax dir), "gemma3-270m-gguf" for the packaged model,
    # or "" to start from random weights of `preset` (tests, from-scratch runs).
    checkpoint: str = "gemma3-270m-gguf"
    preset: str = ""  # a config preset name; "" means read it from the checkpoint
    tokenizer: str = ""  # a SentencePiece .model; "" means next to / inside the checkpoint
    # "auto" (model/precision.py): bfloat16 with f32 accumulation on TPU, GPU and CPUs with
    # AMX, float32 elsewhere; or "float32" / "bfloat16" whatever the machine.
    dtype: str = "auto"  # compute dtype
    param_dtype: str = "auto"  # how the frozen base is stored in memory
    remat: bool = False  # recompute each block in the backward pass (less memory)
    remat_policy: str = "full"  # with remat: "full" keeps nothing, "dots" the projections
    scan_layers: bool = False  # compile one block per attention kind and scan over the layers
    attention_chunk: int = 1024  # longer sequences attend in query chunks of this; 0: never


@dataclasses.dataclass(frozen=True)
class DataSection:
    task: str = "tarr-sentiment"  # a built-in task (a preset of [task]); "" = [task] alone
    prompt: str = ""  # the same as task.prompt (kept for older configs); "" = the task's own
    train: str = "data/tarr/train.tsv"
    test: str = "data/tarr/test.tsv"
    validation_fraction: float = 1 / 3
    # A labelled file to validate on instead of a split of data.train ("" = split); all of
    # data.train is then trained on.
    validation: str = ""
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
    # Cross-validation (classification): folds > 1 trains one adapter per fold on the other
    # folds; their out-of-fold scores give the honest accuracy and the decision threshold.
    folds: int = 0
    # With folds: predict the test set with one model refit on every labelled row (true) or
    # with the mean label scores of the fold models (false).
    refit: bool = False
    # With lora.last_layers: compute the frozen layers below the adapted ones once for every
    # packed row, not at every step (training/frozen_prefix.py). False: every step runs them.
    cache_frozen_layers: bool = True


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """The task, key by key; "" or no value means the preset's (or the generic) default."""

    kind: str = ""  # "classification" | "generation"; set: a task of its own, no preset
    format: str = ""  # csv, tsv, jsonl, json, parquet; "" = from the file's suffix
    id_column: str = ""  # "" = "id" (a file without it: the row's position)
    prompt: str = ""  # the user turn, {column} placeholders
    turns_column: str = ""  # multi-turn chat: a list column of user/model utterances
    system: str = ""  # a system prompt, put before the first user turn (Gemma has no role)
    label_column: str = ""  # classification
    labels: dict[str, str] | None = None  # classification: file value -> the word answered
    answer: str = ""  # generation: the model turn, {column} placeholders
    max_new_tokens: int | None = None  # generation budget per answer (default 256)
    temperature: float | None = None  # 0 = greedy (the default)
    top_k: int | None = None
    top_p: float | None = None
    source_language: str = ""  # translation presets: ko, en, zh, ja
    target_language: str = ""  # the language answers must be in (mismatch rule, metrics)
    metric: str = ""  # the competition's metric, reported first
    submission_columns: tuple[str, ...] = ()  # the submission's columns, the answer's last
    sample_submission: str = ""  # a sample file: its columns, their order and the id order
    validation_size: int | None = None  # validation examples predicted at most (gen.: 256)
    # Two labels: "argmax" (the default: the label with the higher score) or "threshold" (the
    # cut on score(first) - score(second) calibrated on validation or the out-of-fold scores).
    decision: str = ""


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str = "runs"
    name: str = "tarr-sentiment"
    submissions: str = "submissions"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    task: TaskSection = TaskSection()
    # Chosen on out-of-fold accuracy over seeds 0-2 (RESULTS.md): rank 16 beat rank 8 (0.954
    # against 0.945); rank 16 on the last 9 of the 270M's 18 layers at lr 1.5e-3 beat it on every
    # layer at 1e-3 (0.966 against 0.954) and trains in 40% less time.
    lora: LoraConfig = LoraConfig(rank=16, alpha=32.0, last_layers=9)
    optim: OptimConfig = OptimConfig(learning_rate=1.5e-3, schedule="cosine", warmup_steps=10,
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
    kind = "an integer" if convert is int else "a number"
    if isinstance(value, bool) or (convert is int and isinstance(value, float)):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")
    try:
        number = convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _coerce(value, annotation, where: str):
    if annotation in ("float | None", "int | None"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _number(int if annotation == "int | None" else float, value, where)
    if annotation in ("float", float):
        return _number(float, value, where)
    if annotation in ("int", int):
        return _number(int, value, where)
    if annotation in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if "tuple" in str(annotation):
        items = value
        if isinstance(value, str):  # q,k,v or, as in the TOML file, ["q", "k", "v"]
            items = (_toml_value(value, where, 'a list like ["q", "v"] or q,v')
                     if value.strip().startswith("[") else value.split(","))
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of names, got {value!r}")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if "dict" in str(annotation):
        return _table(value, where)
    if annotation in ("str", str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    return value


def _toml_value(value: str, where: str, expected: str):
    """An override's value read as TOML (a list, an inline table); `expected` says what the key
    takes when it is not valid TOML."""
    try:
        return tomllib.loads(f"value = {value}")["value"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: expected {expected}, got {value!r} ({err})") from None


def _table(value, where: str) -> dict[str, str] | None:
    """A TOML table of text -> text; on the command line written as an inline table,
    e.g. task.labels={"1" = "positive", "0" = "negative"}."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _toml_value(value, where, 'an inline table like { "1" = "word" }')
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a non-empty table of value = word, got {value!r}")
    table = {}
    for key, word in value.items():
        if not isinstance(word, (str, int, float)) or isinstance(word, bool):
            raise ConfigError(f"{where}: {key!r} = {word!r}: expected text")
        table[str(key)] = str(word)
    return table


def _section(cls, values: dict, name: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"config section [{name}]: unknown key(s) {sorted(unknown)}; "
                          f"known: {sorted(fields)}")
    values = {k: _coerce(v, fields[k].type, f"{name}.{k}") for k, v in values.items()}
    for field, value in values.items():
        _check_value(f"{name}.{field}", value)
    try:
        return cls(**values)
    except ValueError as err:  # the section's own checks (e.g. LoRA targets)
        raise ConfigError(f"[{name}]: {err}") from None


# key -> (lowest, highest) allowed; None (no value) passes where the default is None.
RANGES: dict[str, tuple[float, float]] = {
    "data.validation_fraction": (0.0, 0.9),
    "data.seq_len": (16, 1 << 20),
    "data.max_prompt_len": (16, 1 << 20),
    "data.batch_size": (1, 1 << 16),
    "lora.rank": (1, 4096),
    "lora.alpha": (1e-6, 1e6),
    "lora.dropout": (0.0, 0.9),
    "lora.last_layers": (0, 1 << 16),
    "optim.learning_rate": (1e-9, 1.0),
    "optim.warmup_steps": (0, 1 << 30),
    "optim.weight_decay": (0.0, 10.0),
    "optim.b1": (0.0, 0.9999),
    "optim.b2": (0.0, 0.99999),
    "optim.clip_norm": (1e-6, 1e6),
    "optim.accumulate_steps": (1, 1 << 16),
    "optim.end_lr_fraction": (0.0, 1.0),
    "train.epochs": (1, 10_000),
    "train.seed": (0, 2**31 - 1),
    "train.max_steps": (0, 1 << 40),
    "train.save_every": (1, 1 << 40),
    "train.keep": (1, 1000),  # 0 would delete the checkpoint a stopped run resumes from
    "train.mesh_data": (-1, 1 << 16),  # -1: the devices left over
    "train.mesh_fsdp": (1, 1 << 16),
    "train.mesh_model": (1, 1 << 16),
    "model.attention_chunk": (0, 1 << 20),
    "train.folds": (0, 100),  # 0 or 1: no cross-validation
    "task.max_new_tokens": (1, 1 << 16),
    "task.temperature": (0.0, 100.0),
    "task.top_k": (1, 1 << 20),
    "task.top_p": (1e-6, 1.0),
    "task.validation_size": (1, 1 << 40),
}
# key -> the values it may take.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "data.task": ("", *TASK_NAMES),
    "data.loss_on": ("answer", "label"),
    "data.on_bad_row": ("error", "skip"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "task.kind": ("", "classification", "generation"),
    "task.decision": ("", "argmax", "threshold"),
    "task.format": ("", *FORMATS),
    "task.source_language": ("", *LANGUAGES),
    "task.target_language": ("", *LANGUAGES),
    "task.metric": ("", *METRICS),
}


def _shown(bound: float) -> str:
    return f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"


def _check_value(key: str, value) -> None:
    """The key's range (RANGES) or choices (CHOICES); None passes (an unset optional)."""
    if key in RANGES and value is not None:
        low, high = RANGES[key]
        if key == "train.mesh_data" and value == 0:
            raise ConfigError(f"{key} = 0: use -1 (the devices left over) or a positive count")
        if not low <= value <= high:
            raise ConfigError(f"{key} = {value!r} is out of range: allowed {_shown(low)} to "
                              f"{_shown(high)}")
    if key in CHOICES and value not in CHOICES[key]:
        allowed = CHOICES[key]
        listed = ", ".join(repr(a) for a in allowed if a) + (' or ""' if "" in allowed else "")
        raise ConfigError(f"{key} = {value!r}: expected one of {listed}")


def _check_together(cfg: RunConfig) -> None:
    """The checks that involve several keys."""
    if cfg.data.prompt and cfg.task.prompt and cfg.data.prompt != cfg.task.prompt:
        raise ConfigError("data.prompt and task.prompt are both set: keep task.prompt")
    if cfg.task.kind and cfg.data.task:
        raise ConfigError(f"data.task = {cfg.data.task!r} (a preset) and task.kind = "
                          f"{cfg.task.kind!r} (a task of its own) are both set: set data.task "
                          "= \"\" to define the task in [task], or drop task.kind to adjust "
                          "the preset")
    if cfg.train.folds > 1 and cfg.data.validation:
        raise ConfigError("train.folds and data.validation exclude each other: with folds, "
                          "every labelled row is validated on out of fold")
    if cfg.train.refit and cfg.train.folds < 2:
        raise ConfigError("train.refit = true goes with train.folds >= 2 (a refit after a "
                          "cross-validation)")
    if cfg.task.kind and not cfg.data.train:
        raise ConfigError("data.train is empty: a [task] of its own trains on its own file")
    if not cfg.task.kind and not cfg.data.task:
        raise ConfigError("no task: set data.task to a built-in task "
                          f"({', '.join(TASK_NAMES)}) or define one with task.kind")
    if not cfg.model.checkpoint and not cfg.model.preset:
        raise ConfigError("model.checkpoint is empty: set it, or set model.preset to start from "
                          "random weights")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.output.name):
        raise ConfigError(f"output.name = {cfg.output.name!r}: the run's folder and submission "
                          "name: letters, digits, '-', '_' or '.', starting with a letter or digit")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, dict] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"{path}: not a file (give --config a .toml file)")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
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
    if raw.get("task", {}).get("kind") and not raw.get("data", {}).get("task"):
        # A [task] of its own: no preset, none of the main job's files, and a run named after
        # the config file rather than the main job's runs/tarr-sentiment.
        data = raw.setdefault("data", {})
        for key in ("task", "train", "test"):
            data.setdefault(key, "")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem).strip("-.") if path else ""
        raw.setdefault("output", {}).setdefault("name", stem or "task")
    default = RunConfig()
    built = {}
    for name in sections:
        current = getattr(default, name)
        merged = {**dataclasses.asdict(current), **raw.get(name, {})}
        built[name] = _section(type(current), merged, name)
    cfg = RunConfig(**built)
    _check_together(cfg)
    return cfg


def _toml_text(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\t", "\\t") + '"'


def to_toml(cfg: RunConfig) -> str:
    """The config as a TOML file that loads back to the same config (`runs/<name>/config.toml`)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        current = getattr(cfg, section.name)
        defaults = {f.name: f.default for f in dataclasses.fields(current)}
        for key, value in dataclasses.asdict(current).items():
            if value is None and defaults.get(key) is None:
                continue  # unset, and unset is the default
            if value is None:  # TOML has no null; "none" reads back as None
                text = '"none"'
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            elif isinstance(value, (tuple, list)):
                text = "[" + ", ".join(_toml_text(str(v)) for v in value) + "]"
            elif isinstance(value, dict):
                text = "{ " + ", ".join(f"{_toml_text(str(k))} = {_toml_text(str(v))}"
                                        for k, v in value.items()) + " }"
            else:
                text = _toml_text(str(value))
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
