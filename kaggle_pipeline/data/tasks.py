"""Tasks: which file reader, which prompt, which answer; records in, conversations out.

A `TaskSpec` says how to read a task's files (`reader`) and how each record becomes a
conversation: the user text is the `prompt` template filled from the record's columns
(`{column}` placeholders), the model text is the `answer` template, or for classification the
label's word from `label_map` (so predictions can be scored by mapping words back to labels).
Dialogue tasks take their turns from a list column instead. `style` is how `chat_template`
renders the turns: "chat" (Gemma's chat turns) or "plain" (the Keras tutorials'
"Instruction:\n...\n\nResponse:\n..." text, one exchange only).

Built-in tasks: `tarr-sentiment` (the default, AIFactory review sentiment), `dolly-en-ko`,
`aihub-dialogue`, `aihub-parallel`, `aihub-summarization`, `aihub-qa`. `get_task(name,
**options)` builds one, options overriding the builder's defaults, e.g.
`get_task("aihub-parallel", source_lang="en", target_lang="ko")`.

`define_task(preset, name, **fields)` is what a run config's `[task]` section becomes: a
built-in task with some fields replaced, or (no preset) a task of its own whose files are read by
the generic table reader (`records.read_table`: CSV, TSV, JSON lines, JSON, Parquet), which
reads exactly the columns the templates and keys name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from kaggle_pipeline.data import records
from kaggle_pipeline.data.chat_template import Style, Turn
from kaggle_pipeline.errors import UserError

Conversation = list[Turn]

KINDS = ("classification", "generation")
STYLES = ("chat", "plain")  # chat_template's styles
LANGUAGES = {"ko": "Korean", "en": "English", "zh": "Chinese", "ja": "Japanese"}
DEFAULT_TASK = "tarr-sentiment"
# A competition's metric (task.metric) and the kind of task it scores.
METRICS = {"accuracy": "classification", "macro_f1": "classification", "bleu": "generation",
           "chrf": "generation", "chrf++": "generation", "rouge_1": "generation",
           "rouge_2": "generation", "rouge_l": "generation", "rouge_l_char": "generation"}
# The run-config key of each TaskSpec field, for messages.
KEYS = {"kind": "task.kind", "format": "task.format", "id_column": "task.id_column",
        "prompt": "task.prompt", "turns_column": "task.turns_column", "system": "task.system",
        "label_column": "task.label_column", "label_map": "task.labels",
        "answer": "task.answer", "source_lang": "task.source_language",
        "target_lang": "task.target_language", "metric": "task.metric",
        "output_columns": "task.submission_columns",
        "sample_submission": "task.sample_submission"}


class TemplateError(UserError):
    """A prompt or answer template that does not fit the task's columns."""


# ----------------------------------------------------------------------------- templates


def template_fields(template: str) -> list[str]:
    """The `{column}` placeholders of a template, in order.

    Only plain names are allowed: no `{}`, `{0}`, `{a.b}`, `{a[0]}`, `{a!r}` or `{a:>5}`,
    so a value can never be reached into or reformatted. `{{` and `}}` are literal braces.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise TemplateError(f"template {template!r}: {err} (write '{{{{' or '}}}}' for a "
                            "literal brace)") from None
    names = []
    for _, name, format_spec, conversion in parts:
        if name is None:
            continue
        if not name.strip() or name.isdigit() or any(c in name for c in ".[]"):
            raise TemplateError(f"template {template!r}: placeholder {{{name}}} must be a "
                                "column name")
        if format_spec or conversion:
            raise TemplateError(f"template {template!r}: placeholder {{{name}}} may not have a "
                                "conversion or format spec")
        names.append(name)
    return names


def check_template(template: str, columns: Sequence[str], *, what: str) -> None:
    """Raise TemplateError naming the first placeholder that is not one of `columns`."""
    for name in template_fields(template):
        if name not in columns:
            raise TemplateError(f"{what} uses {{{name}}}, which is not a column; available "
                                f"columns: {', '.join(columns)}")


def render(template: str, row: dict[str, Any]) -> str:
    """Fill a checked template; braces inside the values stay as they are."""
    return template.format_map({k: "" if v is None else v for k, v in row.items()})


# ----------------------------------------------------------------------------- task specs


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "generation"
    reader: str  # a key of READER_TABLE
    prompt: str | None  # user text, `{column}` placeholders; None for dialogue
    answer: str | None = None  # model text for generation tasks
    style: Style = "chat"  # how chat_template renders the turns, one of STYLES
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # file column -> ours
    label_column: str | None = None
    label_map: dict[int | str, str] | None = None  # label -> the word the model answers
    turns_column: str | None = None  # dialogue: utterances, user first, alternating
    id_column: str | None = "id"
    output_columns: tuple[str, ...] = ()  # the submission's columns, the answer's last
    source_lang: str | None = None  # translation
    target_lang: str | None = None  # the language answers must be in
    format: str | None = None  # the files' format; None: from the suffix (else the reader's)
    system: str | None = None  # a system prompt before the first user turn
    metric: str | None = None  # the competition's metric, a key of METRICS
    sample_submission: str | None = None  # the competition's sample submission file

    def __post_init__(self):
        for value, allowed, what in ((self.kind, KINDS, "kind"),
                                     (self.style, STYLES, "style"),
                                     (self.reader, tuple(READER_TABLE), "reader")):
            if value not in allowed:
                raise ValueError(f"task {self.name!r}: {what} {value!r}, expected one of "
                                 f"{', '.join(allowed)}")
        if self.turns_column is None and self.prompt is None:
            raise ValueError(f"task {self.name!r}: needs a prompt template or a turns column "
                             "(task.prompt or task.turns_column)")
        if self.turns_column is not None and self.style == "plain":
            raise ValueError(f"task {self.name!r}: the plain style holds one exchange; "
                             "a dialogue needs the chat style")
        for template in (self.prompt, self.answer):
            if template is not None:
                template_fields(template)  # syntax only; columns are checked per file
        if self.kind == "classification":
            if not self.label_column or not self.label_map:
                raise ValueError(f"task {self.name!r}: classification needs label_column and "
                                 "label_map (task.label_column and task.labels)")
            words = [word.strip() for word in self.label_map.values()]
            if len(set(words)) != len(words) or not all(words):
                raise ValueError(f"task {self.name!r}: label words must be distinct and "
                                 f"non-empty, got {self.label_map}")
        elif self.turns_column is None and self.answer is None:
            raise ValueError(f"task {self.name!r}: a generation task needs an answer template "
                             "(task.answer) or a turns column (task.turns_column)")
        if self.metric is not None and METRICS.get(self.metric) != self.kind:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} does not score a "
                             f"{self.kind} task")

    @property
    def stratify_column(self) -> str | None:
        """The column a train/validation split keeps the proportions of."""
        return self.label_column if self.kind == "classification" else None

    def replace(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)


def sentiment_task(name: str = DEFAULT_TASK, *, label_map: dict[int | str, str] | None = None,
                   prompt: str | None = None, text_column: str = "comment",
                   label_column: str = "label", reader: str = "tarr",
                   columns: dict[str, str] | None = None, style: Style = "chat",
                   output_columns: tuple[str, ...] = ("id", "comment", "label")) -> TaskSpec:
    """Review sentiment as classification: the model answers with the label's word."""
    label_map = label_map or {1: "긍정", 0: "부정"}
    if prompt is None:
        # Short on purpose: every prompt token is computed in every epoch, and a longer
        # instruction scored no better on the validation split (README).
        question = " ".join(f"{word}인가요" for word in label_map.values())
        prompt = f"리뷰: {{{text_column}}}\n이 리뷰는 {question}?"
    return TaskSpec(name=name, kind="classification", reader=reader, prompt=prompt,
                    style=style, columns=dict(columns or {}), label_column=label_column,
                    label_map=dict(label_map), output_columns=output_columns)


def translation_task(name: str, *, source_lang: str, target_lang: str, reader: str,
                     prompt: str | None = None, columns: dict[str, str] | None = None,
                     style: Style = "chat") -> TaskSpec:
    """Translation from `source_lang` to `target_lang`; the records hold one column per
    language code ("ko", "en", "zh", "ja")."""
    for lang in (source_lang, target_lang):
        if lang not in LANGUAGES:
            raise ValueError(f"task {name!r}: language {lang!r}, expected one of "
                             f"{', '.join(LANGUAGES)}")
    if source_lang == target_lang:
        raise ValueError(f"task {name!r}: source and target language are both {source_lang!r}")
    if prompt is None:
        prompt = (f"Translate the following {LANGUAGES[source_lang]} text into "
                  f"{LANGUAGES[target_lang]}.\n\n{{{source_lang}}}")
    return TaskSpec(name=name, kind="generation", reader=reader, prompt=prompt,
                    answer=f"{{{target_lang}}}", style=style, columns=dict(columns or {}),
                    output_columns=("id", target_lang), source_lang=source_lang,
                    target_lang=target_lang)


def dialogue_task(name: str = "aihub-dialogue", *, reader: str = "aihub-dialogue",
                  style: Style = "chat") -> TaskSpec:
    """Multi-turn chat: human utterances are user turns, system utterances model turns."""
    return TaskSpec(name=name, kind="generation", reader=reader, prompt=None,
                    style=style, turns_column="turns", output_columns=("id", "response"))


def summarization_task(name: str = "aihub-summarization", *,
                       reader: str = "aihub-summarization", prompt: str | None = None,
                       columns: dict[str, str] | None = None,
                       style: Style = "chat") -> TaskSpec:
    return TaskSpec(name=name, kind="generation", reader=reader,
                    prompt=prompt or "다음 글을 요약하세요.\n\n{document}", answer="{summary}",
                    style=style, columns=dict(columns or {}),
                    output_columns=("id", "summary"))


def qa_task(name: str = "aihub-qa", *, reader: str = "aihub-qa", prompt: str | None = None,
            columns: dict[str, str] | None = None, style: Style = "chat") -> TaskSpec:
    default = "다음 글을 읽고 질문에 답하세요.\n\n글: {context}\n\n질문: {question}"
    return TaskSpec(name=name, kind="generation", reader=reader, prompt=prompt or default,
                    answer="{answer}", style=style, columns=dict(columns or {}),
                    output_columns=("id", "answer"))


_BUILT_IN: dict[str, Callable[..., TaskSpec]] = {
    "tarr-sentiment": functools.partial(sentiment_task, "tarr-sentiment"),
    "dolly-en-ko": functools.partial(translation_task, "dolly-en-ko", source_lang="en",
                                     target_lang="ko", reader="dolly"),
    "aihub-dialogue": functools.partial(dialogue_task, "aihub-dialogue"),
    # The ko-en Excel sheets of AI Hub name their columns 원문 (Korean) and 번역문 (English).
    "aihub-parallel": functools.partial(translation_task, "aihub-parallel", source_lang="ko",
                                        target_lang="en", reader="aihub-parallel",
                                        columns={"원문": "ko", "번역문": "en"}),
    "aihub-summarization": functools.partial(summarization_task, "aihub-summarization"),
    "aihub-qa": functools.partial(qa_task, "aihub-qa"),
}
TASK_NAMES = tuple(_BUILT_IN)


def get_task(name: str = DEFAULT_TASK, **options) -> TaskSpec:
    """A built-in task; `options` override its builder's defaults (prompt, label_map, ...)."""
    if name not in _BUILT_IN:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASK_NAMES)}")
    return _BUILT_IN[name](**options)


def answer_column_of(answer: str | None) -> str:
    """The submission column of a generation task of its own: the answer template's only
    placeholder ("{en}" -> "en"), else "prediction"."""
    fields = template_fields(answer) if answer else []
    return fields[0] if len(fields) == 1 and answer == f"{{{fields[0]}}}" else "prediction"


def _preset_labels(preset: TaskSpec, labels: dict) -> dict:
    """Label-map keys as the preset's reader reads the label column (tarr: integers)."""
    if not preset.label_map or not all(isinstance(k, int) for k in preset.label_map):
        return labels
    converted = {}
    for key, word in labels.items():
        try:
            converted[int(key)] = word
        except ValueError:
            raise TemplateError(f"task.labels: {key!r} is not an integer, and task "
                                f"{preset.name!r} reads integer labels") from None
    return converted


def define_task(preset: str | None, name: str, **fields) -> TaskSpec:
    """A task from a run config's [task] fields (TaskSpec field names, only those set).

    With a preset (a built-in task's name) the fields replace its values; those its builder
    takes (prompt, label_map, languages) go through the builder, so what follows from them (the
    sentiment question, the translation's columns) follows. Without, the fields define a task of
    its own read by the generic table reader, named `name`.
    """
    if preset:
        base = get_task(preset)
        if "kind" in fields and fields["kind"] != base.kind:
            raise TemplateError(f"task.kind = {fields['kind']!r}, but task {preset!r} is a "
                                f"{base.kind} task")
        if "label_map" in fields:
            fields["label_map"] = _preset_labels(base, fields["label_map"])
        accepted = inspect.signature(_BUILT_IN[preset]).parameters
        options = {k: v for k, v in fields.items() if k in accepted}
        spec = get_task(preset, **options)
        return spec.replace(**{k: v for k, v in fields.items() if k not in accepted})
    kind = fields.pop("kind", None)
    if kind is None:
        raise TemplateError("task.kind is not set: a task of its own is \"classification\" "
                            "or \"generation\"")
    id_column = fields.pop("id_column", "id")
    if "output_columns" not in fields:
        answer = fields.get("label_column") if kind == "classification" else \
            answer_column_of(fields.get("answer"))
        fields["output_columns"] = (id_column, answer or "prediction")
    return TaskSpec(name=name, kind=kind, reader="table", prompt=fields.pop("prompt", None),
                    id_column=id_column, **fields)


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Reader:
    """How a task's files become records: `read(spec, paths, labelled, on_bad_row)` with
    exactly `files` paths, which `files_described` names in error messages."""

    read: Callable[[TaskSpec, tuple[str | os.PathLike, ...], bool, str], records.ReadResult]
    files: int = 1
    files_described: str = "one file"
    blind_files: int | None = None  # a test file without answers may be fewer files

    def counts(self, labelled: bool) -> tuple[int, ...]:
        """How many paths a read takes."""
        if labelled or self.blind_files is None:
            return (self.files,)
        return (self.files, self.blind_files)

    def describe_files(self) -> str:
        return self.files_described


def _columns(spec: TaskSpec) -> dict[str, str] | None:
    return spec.columns or None


def _placeholders(spec: TaskSpec, labelled: bool) -> dict[str, str]:
    """{column: the key that names it} for every column the templates use."""
    names = {}
    templates = [("prompt", spec.prompt), ("answer", spec.answer if labelled else None)]
    for field, template in templates:
        for column in template_fields(template) if template else ():
            names.setdefault(column, f"a {{placeholder}} of {KEYS[field]}")
    return names


def read_task_table(spec: TaskSpec, path: str | os.PathLike, labelled: bool,
                    on_bad_row: str) -> records.ReadResult:
    """A task of its own: the columns its keys and templates name, read by `read_table`.

    Ids and labels are kept as text (JSON numbers too), so they match the sample submission
    and the label keys; in a test file (`labelled` False) the prompt's columns may be empty,
    since every test row needs a prediction.
    """
    described = _placeholders(spec, labelled)
    required = list(described)
    if spec.turns_column:
        required.append(spec.turns_column)
        described[spec.turns_column] = KEYS["turns_column"]
    if labelled and spec.kind == "classification":
        required.append(spec.label_column)
        described[spec.label_column] = KEYS["label_column"]
    optional = []
    if spec.id_column == "id" and "id" not in required:
        optional.append("id")  # the default: a file without ids numbers its rows
    elif spec.id_column not in required:
        required.insert(0, spec.id_column)
        described[spec.id_column] = KEYS["id_column"]
    labels = {spec.label_column: [str(k) for k in spec.label_map]} \
        if labelled and spec.kind == "classification" else None
    result = records.read_table(
        path, required=list(dict.fromkeys(required)), optional=optional, fmt=spec.format,
        on_bad_row=on_bad_row, labels=labels, unique=[spec.id_column] if spec.id_column in
        (*required, *optional) else [], as_text=[spec.id_column, spec.label_column],
        list_fields=[spec.turns_column] if spec.turns_column else [],
        may_be_empty=[] if labelled else list(_placeholders(spec, False)),
        described=described)
    return records.with_row_ids(result) if spec.id_column == "id" else result


READER_TABLE: dict[str, Reader] = {
    "table": Reader(lambda spec, paths, labelled, bad: read_task_table(
        spec, paths[0], labelled, bad)),
    "tarr": Reader(lambda spec, paths, labelled, bad: records.read_tarr(
        paths[0], labelled=labelled, labels=tuple(spec.label_map or ()),
        columns=_columns(spec), fmt=spec.format or records.suffix_format(paths[0], "tsv"),
        on_bad_row=bad)),
    "dolly": Reader(lambda spec, paths, labelled, bad: records.read_dolly_pairs(
        paths[0], paths[1], on_bad_row=bad) if len(paths) == 2 else records.read_dolly_source(
        paths[0], spec.source_lang, on_bad_row=bad), files=2,
        files_described="two files, English and Korean JSON lines, written "
                        "'english.jsonl,korean.jsonl' (a test file: the source language's alone "
                        "will do)", blind_files=1),
    "aihub-dialogue": Reader(lambda spec, paths, labelled, bad: records.read_aihub_dialogue(
        paths[0], on_bad_row=bad)),
    "aihub-parallel": Reader(lambda spec, paths, labelled, bad: records.read_parallel(
        paths[0], languages=(spec.source_lang, spec.target_lang), columns=_columns(spec),
        fmt=spec.format, labelled=labelled, on_bad_row=bad)),
    "aihub-summarization": Reader(lambda spec, paths, labelled, bad: records.read_summarization(
        paths[0], columns=_columns(spec), fmt=spec.format, labelled=labelled,
        on_bad_row=bad)),
    "aihub-qa": Reader(lambda spec, paths, labelled, bad: records.read_qa(
        paths[0], columns=_columns(spec), fmt=spec.format, labelled=labelled,
        on_bad_row=bad)),
}


def reader_of(spec: TaskSpec) -> Reader:
    return READER_TABLE[spec.reader]


def load_records(spec: TaskSpec, path: str | os.PathLike | Sequence[str | os.PathLike], *,
                 labelled: bool = True, on_bad_row: str = "error") -> records.ReadResult:
    """Read a task's file(s) with its reader: one path, or a sequence of as many as it reads
    (Dolly: English, Korean)."""
    reader = reader_of(spec)
    paths = (path,) if isinstance(path, (str, os.PathLike)) else tuple(path)
    if len(paths) not in reader.counts(labelled):
        raise ValueError(f"task {spec.name!r} reads {reader.describe_files()}; got {path!r}")
    return reader.read(spec, paths, labelled, on_bad_row)


# ----------------------------------------------------------------------------- conversations


@dataclasses.dataclass(frozen=True)
class Example:
    """One record as a conversation; it ends with the model's answer when that is known."""

    id: Any
    conversation: Conversation
    label: int | str | None = None  # classification: the record's label

    @property
    def prompt(self) -> Conversation:
        """The turns the model is given: everything before the final model turn."""
        if self.conversation and self.conversation[-1].role == "model":
            return self.conversation[:-1]
        return self.conversation

    @property
    def answer(self) -> str | None:
        if self.conversation and self.conversation[-1].role == "model":
            return self.conversation[-1].text
        return None


def _check_columns(spec: TaskSpec, columns: Sequence[str], with_answers: bool) -> None:
    """Fail before the first row if the task asks for a column the records do not have."""
    needed = ["id_column", "turns_column"]
    if with_answers and spec.kind == "classification":
        needed.append("label_column")
    for field in needed:
        name = getattr(spec, field)
        if name is not None and name not in columns:
            raise TemplateError(f"task {spec.name!r}: {KEYS[field]} = {name!r} is not a column; "
                                f"available columns: {', '.join(columns)}")
    if spec.prompt is not None:
        check_template(spec.prompt, columns, what=f"{KEYS['prompt']} of task {spec.name!r}")
    if with_answers and spec.answer is not None:
        check_template(spec.answer, columns, what=f"{KEYS['answer']} of task {spec.name!r}")


def _dialogue(spec: TaskSpec, row: dict[str, Any], number: int,
              with_answers: bool) -> Conversation:
    """The utterances as turns, user first. Without answers (a test file) the conversation
    ends with a user turn: a dialogue ending with a model turn drops it."""
    utterances = row[spec.turns_column]
    if not utterances or (with_answers and len(utterances) % 2):
        raise records.DataError(
            f"task {spec.name!r}: row {number}, field {spec.turns_column!r}: expected user and "
            f"model utterances in pairs, got {len(utterances or ())} utterances")
    turns = [Turn("user" if i % 2 == 0 else "model", text) for i, text in enumerate(utterances)]
    return turns if with_answers or len(turns) % 2 else turns[:-1]


def _answer(spec: TaskSpec, row: dict[str, Any], number: int) -> str:
    if spec.kind == "generation":
        return render(spec.answer, row)
    label = row[spec.label_column]
    if label not in spec.label_map:
        raise records.DataError(f"task {spec.name!r}: row {number}, field "
                                f"{spec.label_column!r}: label {label!r} is not one of "
                                f"{', '.join(repr(k) for k in spec.label_map)} (task.labels)")
    return spec.label_map[label]


def build_examples(spec: TaskSpec, frame: pl.DataFrame, *,
                   with_answers: bool = True) -> list[Example]:
    """One Example per row. Without answers (a test file) each conversation ends with the
    user turn the model must answer; a dialogue then drops its last model turn."""
    _check_columns(spec, frame.columns, with_answers)
    system = [Turn("system", spec.system)] if spec.system else []
    examples = []
    for number, row in enumerate(frame.iter_rows(named=True), start=1):
        example_id = row[spec.id_column] if spec.id_column else number
        if spec.turns_column is not None:
            examples.append(Example(example_id, system + _dialogue(spec, row, number,
                                                                   with_answers)))
            continue
        turns = [*system, Turn("user", render(spec.prompt, row))]
        if with_answers:
            turns.append(Turn("model", _answer(spec, row, number)))
        label = row[spec.label_column] if with_answers and spec.kind == "classification" \
            else None
        examples.append(Example(example_id, turns, label))
    return examples


# ----------------------------------------------------------------------------- split


def _shuffled_strata(frame: pl.DataFrame, seed: int, stratify_by: str | None
                     ) -> list[list[int]]:
    """The row indices of each value of `stratify_by` (all rows as one stratum without it),
    each shuffled by one generator seeded with `seed`, the strata in a fixed order whatever the
    row order: the split and the folds of the same seed are reproducible."""
    if stratify_by is not None and stratify_by not in frame.columns:
        raise ValueError(f"cannot stratify by {stratify_by!r}: columns are {frame.columns}")
    keys = frame[stratify_by].to_list() if stratify_by else [None] * len(frame)
    strata: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        strata.setdefault(key, []).append(index)
    rng = random.Random(seed)
    shuffled = []
    for key in sorted(strata, key=repr):
        indices = strata[key]
        rng.shuffle(indices)
        shuffled.append(indices)
    return shuffled


def train_validation_split(frame: pl.DataFrame, *, validation_fraction: float, seed: int,
                           stratify_by: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, validation), the same for the same seed; rows keep their order.

    With `stratify_by`, each value of that column sends round(n * fraction) of its n rows to
    validation, so both parts keep the label proportions.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    chosen: set[int] = set()
    for indices in _shuffled_strata(frame, seed, stratify_by):
        chosen.update(indices[:int(len(indices) * validation_fraction + 0.5)])
    in_validation = pl.Series([index in chosen for index in range(len(frame))])
    return frame.filter(~in_validation), frame.filter(in_validation)


def fold_assignment(frame: pl.DataFrame, *, folds: int, seed: int,
                    stratify_by: str | None = None) -> list[int]:
    """The fold (0 .. folds-1) of every row, the same for the same seed: each value of
    `stratify_by` is shuffled and dealt round-robin over the folds (continuing where the previous
    value stopped), so every fold keeps the label proportions and fold sizes differ by at most
    one row."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(frame) < folds:
        raise ValueError(f"{len(frame)} rows cannot make {folds} folds")
    assigned = [0] * len(frame)
    dealt = 0
    for indices in _shuffled_strata(frame, seed, stratify_by):
        for index in indices:
            assigned[index] = dealt % folds
            dealt += 1
    return assigned
