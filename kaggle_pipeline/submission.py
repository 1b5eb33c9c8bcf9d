"""Submission files in exactly the competition's sample format, validated and written atomically.

The sample fixes everything: the columns and their order, the separator (tab for `.tsv`, comma
for `.csv`, sniffed from the header otherwise) and the order of the ids. Columns the sample
already has (e.g. AIFactory's `comment`) are copied from it verbatim; only the label column
comes from the predictions. A sample without the label column (AIFactory's `test.tsv`: `id`,
`comment`) gets it appended at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from kaggle_pipeline.errors import UserError
from kaggle_pipeline.files import write_atomically

SEPARATORS = {".tsv": "\t", ".csv": ","}
_MAX_LISTED = 5  # ids named in one error message


class SubmissionError(UserError):
    """A submission that does not fit the competition's sample."""


def submission_path(name: str, ext: str, now: dt.datetime | None = None, *,
                    root: str | os.PathLike = "submissions") -> Path:
    """`submissions/<name>-<YYYYmmdd-HHMMSS>.<ext>`, `name` the run's (output.name); a second
    submission in the same second gets `-2`, `-3`, ... so none is overwritten."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SubmissionError(f"output.name {name!r}: a submission name must be letters, "
                              "digits, '-', '_' or '.'")
    ext = ext.lstrip(".")
    if "." + ext not in SEPARATORS:
        raise ValueError(f"submission extension {ext!r}: expected one of csv, tsv")
    now = now or dt.datetime.now()
    stem = Path(root) / f"{name}-{now:%Y%m%d-%H%M%S}"
    path, number = stem.with_name(f"{stem.name}.{ext}"), 1
    while path.exists():
        number += 1
        path = stem.with_name(f"{stem.name}-{number}.{ext}")
    return path


def separator_for(path: str | os.PathLike) -> str:
    """The sample's separator: by extension, else tab if the header line has one."""
    path = Path(path)
    if path.suffix.lower() in SEPARATORS:
        return SEPARATORS[path.suffix.lower()]
    with open(path, encoding="utf-8") as f:
        header = f.readline()
    return "\t" if "\t" in header else ","


def read_sample(path: str | os.PathLike) -> pl.DataFrame:
    """Every column as text, so ids such as `007` keep their form."""
    sep = separator_for(path)
    # TSV samples are unquoted: a comment that starts with '"' is text, not a quoted field.
    return pl.read_csv(path, separator=sep, infer_schema=False,
                       quote_char=None if sep == "\t" else '"')


def _listed(values: Iterable) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return shown + more


def _as_text(values: pl.Series) -> list[str | None]:
    return [None if v is None else str(v) for v in values.to_list()]


def build_submission(df: pl.DataFrame, sample: pl.DataFrame, *, id_col: str, label_col: str,
                     label_domain: Iterable | None, source: str = "predictions",
                     sample_name: str = "sample") -> pl.DataFrame:
    """The sample's rows and columns with the label column filled from `df`, or a
    SubmissionError naming the file, row and field at fault."""
    for name, frame, cols in ((source, df, (id_col, label_col)), (sample_name, sample, (id_col,))):
        for col in cols:
            if col not in frame.columns:
                raise SubmissionError(f"{name}: no column {col!r} (columns: {frame.columns})")

    sample_ids = _as_text(sample[id_col])
    seen: dict[str, int] = {}
    for row, value in enumerate(sample_ids):
        if value is None or value == "":
            raise SubmissionError(f"{sample_name}: row {row}, field {id_col!r}: empty id")
        if value in seen:
            raise SubmissionError(f"{sample_name}: rows {seen[value]} and {row}, field "
                                  f"{id_col!r}: duplicate id {value!r}")
        seen[value] = row

    pred_ids, labels = _as_text(df[id_col]), df[label_col].to_list()
    label_by_id: dict[str, object] = {}
    first_row: dict[str, int] = {}
    for row, (value, label) in enumerate(zip(pred_ids, labels, strict=True)):
        if value is None:
            raise SubmissionError(f"{source}: row {row}, field {id_col!r}: null id")
        if value in first_row:
            raise SubmissionError(f"{source}: rows {first_row[value]} and {row}, field "
                                  f"{id_col!r}: duplicate id {value!r}")
        first_row[value] = row
        label_by_id[value] = label

    missing = [i for i in sample_ids if i not in label_by_id]
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} ids of {sample_name} have no "
                              f"prediction (field {id_col!r}): {_listed(missing)}")
    extra = [i for i in pred_ids if i not in seen]
    if extra:
        raise SubmissionError(f"{source}: {len(extra)} ids are not in {sample_name} (field "
                              f"{id_col!r}): {_listed(extra)}")

    # Labels are checked in the text form they will have in the file.
    domain = None if label_domain is None else {str(v) for v in label_domain}
    texts = []
    for value in sample_ids:
        label, row = label_by_id[value], first_row[value]
        if label is None or (isinstance(label, float) and label != label):
            raise SubmissionError(f"{source}: row {row} (id {value!r}), field {label_col!r}: "
                                  "null label")
        text = str(label)
        if domain is not None and text not in domain:
            raise SubmissionError(f"{source}: row {row} (id {value!r}), field {label_col!r}: "
                                  f"label {text!r} is not one of {sorted(domain)}")
        if domain is None and not text.strip():
            raise SubmissionError(f"{source}: row {row} (id {value!r}), field {label_col!r}: "
                                  "empty label")
        texts.append(text)

    labelled = sample.with_columns(pl.Series(label_col, texts, dtype=pl.String))
    columns = sample.columns if label_col in sample.columns else [*sample.columns, label_col]
    return labelled.select(columns)


def _check_unquoted_cells(frame: pl.DataFrame, sep: str, path: Path) -> None:
    # A TSV is written unquoted like the sample, so a tab or newline inside a cell would
    # shift columns; refuse it.
    for col in frame.columns:
        for row, value in enumerate(frame[col].to_list()):
            if value is not None and (sep in value or "\n" in value or "\r" in value):
                raise SubmissionError(f"{path}: row {row}, field {col!r}: value contains a "
                                      "tab or line break, which a TSV cannot hold")


def write_submission(df: pl.DataFrame, path: str | os.PathLike, *,
                     sample: pl.DataFrame | str | os.PathLike, id_col: str, label_col: str,
                     label_domain: Iterable | None, sep: str | None = None) -> Path:
    """Write `df`'s labels in the sample's format to `path`; returns the path.

    `sample` is the competition's sample file (its separator is used) or a DataFrame (then the
    separator comes from `sep`, else from `path`'s extension). `label_domain=None` accepts any
    non-empty text (generation tasks). Nothing is written when validation fails.
    """
    path = Path(path)
    if isinstance(sample, pl.DataFrame):
        sample_frame, sample_name = sample, "sample"
        if sep is None:
            if path.suffix.lower() not in SEPARATORS:
                raise ValueError(f"{path}: give sep= or a .csv/.tsv path")
            sep = SEPARATORS[path.suffix.lower()]
    else:
        sample_frame, sample_name = read_sample(sample), str(sample)
        sep = sep or separator_for(sample)
    frame = build_submission(df, sample_frame, id_col=id_col, label_col=label_col,
                             label_domain=label_domain, sample_name=sample_name)
    if sep == "\t":
        _check_unquoted_cells(frame, sep, path)
        write_atomically(path, lambda tmp: frame.write_csv(tmp, separator=sep,
                                                           quote_style="never"))
    else:
        write_atomically(path, lambda tmp: frame.write_csv(tmp, separator=sep))
    return path


# A submission cell may not be empty; an answer that decodes to nothing is written as this.
EMPTY_ANSWER = "-"
_NOT_TABLES = (".json", ".jsonl", ".ndjson", ".parquet")


def answer_column(spec) -> str:
    """The submission column a task's predictions go to: the last submission column, else
    the label column (classification) or "prediction"."""
    if spec.output_columns:
        return spec.output_columns[-1]
    return spec.label_column if spec.kind == "classification" else "prediction"


def _cell_text(prediction, separator: str) -> str:
    text = str(prediction)
    if separator == "\t":  # an unquoted TSV cell cannot hold a tab or a line break
        text = " ".join(text.split())
    return text if text.strip() else EMPTY_ANSWER


def _base(spec, test_file: Path, ids: list) -> tuple[pl.DataFrame | Path, str, str]:
    """(what the submission copies its rows and columns from, its name, the separator).

    The competition's sample when the task names one; else the test file when it is a table
    with the id column (AIFactory's test.tsv `id, comment` becomes `id, comment, label`), else
    just the ids."""
    id_col = spec.id_column or "id"
    if spec.sample_submission:
        sample = Path(spec.sample_submission)
        if not sample.is_file():
            raise SubmissionError(f"task.sample_submission: {sample} does not exist")
        return sample, str(sample), separator_for(sample)
    test_file = Path(test_file)
    if test_file.suffix.lower() not in _NOT_TABLES:
        sep = separator_for(test_file)
        if id_col in read_sample(test_file).columns:
            return test_file, str(test_file), sep
    else:
        sep = ","
    return pl.DataFrame({id_col: [str(i) for i in ids]}), "the test ids", sep


def check_sample(spec, test_file: Path, ids: list) -> None:
    """Before anything is trained: the sample submission (when the task has one) has the id
    column, each of its ids is a test row and each test row is one of its ids."""
    if not spec.sample_submission:
        return
    base, name, _ = _base(spec, test_file, ids)
    sample = read_sample(base)
    id_col = spec.id_column or "id"
    if id_col not in sample.columns:
        raise SubmissionError(f"{name}: no id column {id_col!r} (task.id_column); the file has "
                              f"columns: {', '.join(repr(c) for c in sample.columns)}")
    answer = answer_column(spec)
    if answer not in sample.columns:
        raise SubmissionError(f"{name}: no column {answer!r} for the predictions (columns: "
                              f"{', '.join(sample.columns)}); name it with "
                              "task.submission_columns, the answer's column last")
    sample_ids = _as_text(sample[id_col])
    test_ids = {str(i) for i in ids}
    missing = [i for i in sample_ids if i not in test_ids]
    if missing:
        raise SubmissionError(f"{name}: {len(missing)} ids are not rows of the test file "
                              f"{test_file}: {_listed(missing)}")
    extra = sorted(test_ids - set(sample_ids))
    if extra:
        raise SubmissionError(f"{test_file}: {len(extra)} test ids are not in {name}: "
                              f"{_listed(extra)}")


def write_task_submission(spec, test_file: Path, root: str | os.PathLike, ids: list,
                          predictions: list, *, run_name: str | None = None) -> Path:
    """A task's predictions as `<root>/<run name>-<timestamp>.<csv|tsv>`, validated against
    the sample; returns its path.

    The rows, their order and the columns are the sample submission's (task.sample_submission),
    else the test file's when it is a table with ids, else the ids'; the answer column is filled
    (appended when the base lacks it). task.submission_columns then picks and orders the columns.
    Classification labels must be the task's; generation answers are text on one line.
    """
    check_sample(spec, test_file, ids)
    base, name, sep = _base(spec, test_file, ids)
    path = submission_path(run_name or spec.name, "tsv" if sep == "\t" else "csv", root=root)
    id_col, label_col = spec.id_column or "id", answer_column(spec)
    if spec.kind == "classification":
        domain = [str(k) for k in spec.label_map]
        texts = [str(p) for p in predictions]
    else:
        domain = None
        texts = [_cell_text(p, sep) for p in predictions]
        empty = [str(i) for i, p in zip(ids, predictions, strict=True) if not str(p).strip()]
        if empty:
            from kaggle_pipeline.cli import log

            log(f"warning: {len(empty)} empty answers written as {EMPTY_ANSWER!r} "
                f"(ids {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})")
    frame = pl.DataFrame({id_col: [str(i) for i in ids], label_col: texts})
    sample = read_sample(base) if isinstance(base, Path) else base
    built = build_submission(frame, sample, id_col=id_col, label_col=label_col,
                             label_domain=domain, sample_name=name)
    if spec.output_columns and not spec.sample_submission:
        missing = [c for c in spec.output_columns if c not in built.columns]
        if missing:
            raise SubmissionError(f"task.submission_columns: {missing} are not columns of "
                                  f"{name} (columns: {', '.join(built.columns)})")
        built = built.select(list(spec.output_columns))
    return write_submission(built, path, sample=built, id_col=id_col, label_col=label_col,
                            label_domain=domain, sep=sep)
