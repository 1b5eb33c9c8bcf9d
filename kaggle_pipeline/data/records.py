"""Read competition files into validated polars DataFrames, one row per record.

`read_table` reads CSV, TSV, JSON lines, JSON and Parquet, renames the file's columns to ours
and checks every row. A bad row (missing or null field, empty text, wrong type, label outside
the allowed set, broken line, invalid UTF-8) raises `DataError` naming the file, the row and
the field, or with `on_bad_row="skip"` is dropped and listed in `ReadResult.skipped`.

Rows are located the way you would find them in the file: "line N" for CSV, TSV and JSON lines
(physical lines, the header is line 1), "record N" for the N-th object of a JSON list, "data
row N" for Parquet (header not counted), and a JSON path for nested files.

Text files are parsed with the standard library, not polars' readers: polars drops blank lines
(so line numbers drift), silently turns JSON numbers into strings, and stops at the first ragged
line without saying which. The checked rows are then put into a polars DataFrame.

Readers for the real formats build on it:

- `read_tarr`: AIFactory review sentiment TSV (`id`, `comment`, `label` 1/0; test without label).
- `read_dolly_pairs`: databricks-dolly-15k and dolly-15k-ko JSON lines, aligned line by line
  into English-Korean pairs (instruction, context, response each a pair; empty context skipped).
- `read_aihub_dialogue`: AI Hub emotional dialogue JSON (`talk.content` HS01, SS01, HS02, ...).
- `read_parallel`: AI Hub parallel corpora (`원문`/`번역문`, `ko`/`en`, `한국어`/`중국어`, ...).
- `read_summarization`: one object or row per document, fields `document` and `summary`.
- `read_qa`: flat rows with `context`, `question`, `answer`, or SQuAD-style JSON
  (`data[].paragraphs[].qas[]`, as in AI Hub machine reading comprehension and KorQuAD).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from kaggle_pipeline.errors import UserError

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "json", ".parquet": "parquet"}
ON_BAD_ROW = ("error", "skip")
TARR_LABELS = (0, 1)
DOLLY_TEXT_FIELDS = ("instruction", "context", "response")

_INTEGER = re.compile(r"[+-]?[0-9]+")


class DataError(UserError):
    """A file that cannot be used as it is; the message names the file, the row and the field."""


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    path: Path
    where: str  # "line 4", "record 2", "data row 7", "data[0].paragraphs[1].qas[2]"
    field: str | None  # the file's own name for the field, None for a broken line
    reason: str

    def __str__(self) -> str:
        field = f", field '{self.field}'" if self.field else ""
        return f"{self.path}: {self.where}{field}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """The good rows of a file, and the rows that were skipped and why."""

    frame: pl.DataFrame
    skipped: tuple[SkippedRow, ...]
    rows_read: int  # records in the file, good and skipped (blank lines not counted)
    row_where: tuple[str, ...]  # for each row of `frame`, where it is in the file
    row_index: tuple[int, ...]  # for each row of `frame`, its 0-based position among the records

    def report(self) -> str:
        if not self.skipped:
            return f"read {len(self.frame)} rows, skipped none"
        lines = [f"read {len(self.frame)} rows, skipped {len(self.skipped)} of {self.rows_read}:"]
        lines += [f"  {row}" for row in self.skipped]
        return "\n".join(lines)


class _RowError(Exception):
    """One bad row; turned into a DataError or a SkippedRow by `_collect`."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class _RawRow:
    where: str
    values: dict[str, Any] | None  # None when the row could not be parsed at all
    problem: str | None = None  # why it could not be parsed


# ----------------------------------------------------------------------------- bytes and text


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".xlsx", ".xls"):
        raise DataError(f"{path}: Excel files are not read directly; save the sheet as "
                        "CSV UTF-8 (or JSON) and read that")
    if suffix not in SUFFIX_FORMATS:
        raise DataError(f"{path}: cannot tell the format from the suffix {suffix!r}; "
                        f"give fmt (one of {', '.join(FORMATS)})")
    return SUFFIX_FORMATS[suffix]


def suffix_format(path: str | os.PathLike, default: str) -> str:
    """The format the suffix names, else `default` (AIFactory's files: TSV whatever the name)."""
    return SUFFIX_FORMATS.get(Path(path).suffix.lower(), default)


def _utf8_problem(data: bytes, err: UnicodeDecodeError) -> str:
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"invalid UTF-8 (byte 0x{data[err.start]:02x} at byte column {column})"


def _korean_legacy_hint(data: bytes) -> str:
    try:
        data.decode("cp949")
    except UnicodeDecodeError:
        return ""
    return "; the file looks like CP949/EUC-KR: save it as UTF-8"


def _decode(path: Path, data: bytes, *, line_based: bool, on_bad_row: str
            ) -> tuple[str, dict[int, str]]:
    """The file's text, and {line: reason} for lines blanked out because they were not UTF-8.

    Lines are only blanked (never removed) so every later line keeps its number; a whole-file
    format (JSON) cannot lose a line, so there a bad byte is always an error.
    """
    _check_on_bad_row(on_bad_row)
    if data.startswith(codecs.BOM_UTF8):  # Excel's "CSV UTF-8" starts with a BOM
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8"), {}
    except UnicodeDecodeError as err:
        if on_bad_row == "error" or not line_based:
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(f"{path}: line {line}: {_utf8_problem(data, err)}"
                            f"{_korean_legacy_hint(data)}") from None
    lines, bad = [], {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            lines.append("")
            bad[number] = _utf8_problem(raw, err)
    if 1 in bad:
        raise DataError(f"{path}: line 1 (the header): {bad[1]}")
    return "\n".join(lines), bad


# ----------------------------------------------------------------------------- parsing


def _delimited_rows(path: Path, text: str, fmt: str, bad_lines: dict[int, str]
                    ) -> tuple[list[str], Iterator[_RawRow]]:
    if fmt == "tsv":
        # AIFactory's TSVs are unquoted: a comment starting with '"' is text, not a quoted field.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                            quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise DataError(f"{path}: line 1 (the header): {err}") from None
    if header is None or not any(name.strip() for name in header):
        raise DataError(f"{path}: no header line")
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: line 1 (the header): duplicate column "
                        f"{', '.join(repr(n) for n in duplicates)}")

    def rows() -> Iterator[_RawRow]:
        last_line = reader.line_num
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}: line {last_line + 1}: {err}") from None
            first_line, last_line = last_line + 1, reader.line_num
            where = f"line {first_line}"
            if not fields:  # a blank line, or one blanked by _decode
                if first_line in bad_lines:
                    yield _RawRow(where, None, bad_lines[first_line])
                continue
            if len(fields) != len(header):
                hint = " (a tab inside the text?)" if fmt == "tsv" and len(fields) > len(header) \
                    else ""
                yield _RawRow(where, None, f"has {len(fields)} fields but the header has "
                                           f"{len(header)}{hint}")
                continue
            yield _RawRow(where, dict(zip(header, fields, strict=True)))

    return header, rows()


def _json_lines_rows(text: str, bad_lines: dict[int, str]) -> Iterator[_RawRow]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        where = f"line {number}"
        if number in bad_lines:
            yield _RawRow(where, None, bad_lines[number])
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield _RawRow(where, None, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(value, dict):
            yield _RawRow(where, None, f"expected a JSON object, got {_type_name(value)}")
            continue
        yield _RawRow(where, value)


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}, column {err.colno}: not valid JSON: "
                        f"{err.msg}") from None


def _json_records(path: Path, document: Any) -> Iterator[_RawRow]:
    """The objects of a JSON list, or of the list under "data" (AI Hub's usual wrapper)."""
    items = document.get("data") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of records or an object with a 'data' "
                        f"list, got {_type_name(document)}")
    for number, item in enumerate(items, start=1):
        where = f"record {number}"
        if isinstance(item, dict):
            yield _RawRow(where, item)
        else:
            yield _RawRow(where, None, f"expected a JSON object, got {_type_name(item)}")


def _read_rows(path: Path, fmt: str, on_bad_row: str
               ) -> tuple[list[str] | None, Iterable[_RawRow]]:
    """(header, rows); the header is None for JSON formats, whose records have their own keys."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "parquet":
        try:
            frame = pl.read_parquet(path)
        except Exception as err:  # polars raises several types for broken or non-UTF-8 files
            raise DataError(f"{path}: cannot read Parquet: {err}") from None
        rows = (_RawRow(f"data row {n}", values)
                for n, values in enumerate(frame.iter_rows(named=True), start=1))
        return frame.columns, rows
    data = path.read_bytes()
    text, bad_lines = _decode(path, data, line_based=fmt != "json", on_bad_row=on_bad_row)
    if fmt in ("csv", "tsv"):
        return _delimited_rows(path, text, fmt, bad_lines)
    if fmt == "jsonl":
        return None, _json_lines_rows(text, bad_lines)
    return None, _json_records(path, _load_json(path, text))


# ----------------------------------------------------------------------------- checking


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "text",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text(field: str, value: Any, *, required: bool) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected text, got {_type_name(value)} ({value!r})")
    if required and not value.strip():
        raise _RowError(field, "empty text" if value == "" else "whitespace-only text")
    return value


def _texts(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError(field, f"expected a list of texts, got {_type_name(value)}")
    return value


def _integer(field: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty value")
        if _INTEGER.fullmatch(value.strip()):
            return int(value)
    raise _RowError(field, f"expected an integer, got {_type_name(value)} ({value!r})")


@dataclasses.dataclass(frozen=True)
class _Checked:
    records: list[dict]
    where: list[str]
    index: list[int]
    skipped: list[SkippedRow]
    rows_read: int

    def result(self, schema: dict[str, pl.DataType]) -> ReadResult:
        return ReadResult(_frame(self.records, schema), tuple(self.skipped), self.rows_read,
                          tuple(self.where), tuple(self.index))


def _collect(path: Path, rows: Iterable[_RawRow], check: Callable[[dict[str, Any]], dict],
             on_bad_row: str, *, unique: Sequence[str] = ()) -> _Checked:
    """Run `check` on every row, keeping the good records and where they came from."""
    _check_on_bad_row(on_bad_row)
    records, wheres, indices, skipped = [], [], [], []
    first_seen: dict[tuple[str, Any], str] = {}
    rows_read = 0
    for row in rows:
        rows_read += 1
        try:
            if row.values is None:
                raise _RowError(None, row.problem or "unreadable row")
            record = check(row.values)
            for name in unique:
                key = (name, record[name])
                if key in first_seen:
                    raise _RowError(name, f"duplicate value {record[name]!r} (first at "
                                          f"{first_seen[key]})")
            for name in unique:
                first_seen[(name, record[name])] = row.where
        except _RowError as err:
            bad = SkippedRow(path, row.where, err.field, err.reason)
            if on_bad_row == "error":
                raise DataError(str(bad)) from None
            skipped.append(bad)
            continue
        records.append(record)
        wheres.append(row.where)
        indices.append(rows_read - 1)
    if not records:
        detail = f"; {len(skipped)} rows skipped, the first: {skipped[0]}" if skipped else ""
        raise DataError(f"{path}: no usable rows{detail}")
    return _Checked(records, wheres, indices, skipped, rows_read)


def _frame(records: list[dict], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame({name: [r.get(name) for r in records] for name in schema}, schema=schema)


def _source_names(columns: dict[str, str] | None, fields: Iterable[str]) -> dict[str, str]:
    """{our field: the file's column} from a {file column: our field} mapping."""
    columns = columns or {}
    targets = list(columns.values())
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise ValueError(f"column mapping {columns} maps two columns to {repeated}")
    ours_to_file = {ours: source for source, ours in columns.items()}
    return {name: ours_to_file.get(name, name) for name in fields}


def _separator_hint(found: Sequence[str], fmt: str | None) -> str:
    """A header read as one column that holds another separator: the wrong format."""
    if len(found) != 1:
        return ""
    for separator, name, key in ((",", "comma", "csv"), ("\t", "tab", "tsv"),
                                 (";", "semicolon", None)):
        if separator in found[0] and key != fmt:
            to = f'set task.format = "{key}" or ' if key else ""
            return (f" (the header is one column holding {name}s: the file is "
                    f"{name}-separated, read as {fmt}; {to}save it as {fmt})")
    return ""


def _missing_column(path: Path, source: str, ours: str, found: Sequence[str], *,
                    described: str | None = None, fmt: str | None = None) -> DataError:
    mapped = f" (read as '{ours}')" if source != ours else ""
    named = f" ({described})" if described else ""
    return DataError(f"{path}: missing column '{source}'{mapped}{named}; the file has columns: "
                     f"{', '.join(repr(name) for name in found)}{_separator_hint(found, fmt)}")


# ----------------------------------------------------------------------------- generic table


def read_table(path: str | os.PathLike, *, required: Sequence[str],
               optional: Sequence[str] = (), columns: dict[str, str] | None = None,
               fmt: str | None = None, on_bad_row: str = "error",
               int_fields: Collection[str] = (), labels: dict[str, Collection] | None = None,
               unique: Sequence[str] = (), as_text: Collection[str] = (),
               list_fields: Collection[str] = (), may_be_empty: Collection[str] = (),
               described: dict[str, str] | None = None) -> ReadResult:
    """Read a table and keep the fields we name, checked row by row.

    `columns` renames the file's columns to ours ({"원문": "ko"}); `required` and `optional`
    use our names. A required field must be in every row, not null and, unless it is an
    integer field, non-blank text. An optional field may be missing, null or empty (dolly's
    `context`) and is left out of the frame when no row has it. `int_fields` must be integers
    (in CSV, the text of one); `labels` gives a field's allowed values; `unique` fields must not
    repeat. `as_text` fields take numbers too (JSON ids and labels) and keep them as text;
    `list_fields` hold lists of text (chat turns); `may_be_empty` text fields may be blank (a
    test file's text, which still needs a prediction). A missing column is always an error,
    `described` says what asked for it (e.g. "task.label_column"); bad rows raise or, with
    `on_bad_row="skip"`, are dropped and reported in `ReadResult.skipped`.
    """
    path = Path(path)
    fmt = detect_format(path, fmt)
    labels = labels or {}
    sources = _source_names(columns, [*required, *optional])
    header, rows = _read_rows(path, fmt, on_bad_row)
    described = described or {}
    if header is not None:
        for name in required:
            if sources[name] not in header:
                raise _missing_column(path, sources[name], name, header,
                                      described=described.get(name), fmt=fmt)
        present = [name for name in (*required, *optional) if sources[name] in header]
    else:
        rows = list(rows)  # JSON: a column is missing only when no record has it
        keys = {key for row in rows if row.values is not None for key in row.values}
        for name in required:
            if sources[name] not in keys and any(row.values is not None for row in rows):
                raise _missing_column(path, sources[name], name, sorted(keys),
                                      described=described.get(name), fmt=fmt)
        present = [name for name in (*required, *optional) if sources[name] in keys]

    def check(values: dict[str, Any]) -> dict[str, Any]:
        record = {}
        for name in present:
            field, is_required = sources[name], name in required
            if field not in values or values[field] is None:
                if is_required:
                    raise _RowError(field, "missing field" if field not in values
                                    else "null value")
                record[name] = None
                continue
            value = values[field]
            if name in as_text and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if name in int_fields:
                value = None if not is_required and value == "" else _integer(field, value)
            elif name in list_fields:
                value = _texts(field, value)
            else:
                value = _text(field, value, required=is_required and name not in may_be_empty)
            if name in labels and value is not None and value not in labels[name]:
                allowed = ", ".join(repr(v) for v in labels[name])
                raise _RowError(field, f"label {value!r} is not one of {allowed}")
            record[name] = value
        return record

    checked = _collect(path, rows, check, on_bad_row,
                       unique=[name for name in unique if name in present])
    return checked.result({name: pl.Int64 if name in int_fields else
                           pl.List(pl.String) if name in list_fields else pl.String
                           for name in present})


def with_row_ids(result: ReadResult) -> ReadResult:
    """Files without ids: a row's id is its 1-based position among the file's records."""
    if "id" in result.frame.columns:
        return result
    ids = [str(index + 1) for index in result.row_index]
    frame = result.frame.select(pl.Series("id", ids, dtype=pl.String), pl.all())
    return dataclasses.replace(result, frame=frame)


# ----------------------------------------------------------------------------- real formats


def read_tarr(path: str | os.PathLike, *, labelled: bool = True,
              labels: Collection[int | str] = TARR_LABELS, columns: dict[str, str] | None = None,
              fmt: str = "tsv", on_bad_row: str = "error") -> ReadResult:
    """AIFactory review sentiment: `id`, `comment` and, when `labelled`, `label` (1 or 0).

    The test file (`labelled=False`) has no label column. Ids must be unique integers.
    """
    required = ["id", "comment", "label"] if labelled else ["id", "comment"]
    return read_table(path, required=required, columns=columns, fmt=fmt, on_bad_row=on_bad_row,
                      int_fields={"id", "label"}, labels={"label": labels}, unique=["id"])


def read_dolly_pairs(en_path: str | os.PathLike, ko_path: str | os.PathLike, *,
                     on_bad_row: str = "error") -> ReadResult:
    """databricks-dolly-15k and its Korean translation, aligned record by record.

    Each record gives up to three English-Korean pairs, in the order instruction, context,
    response; a context empty in both files is skipped. The files must have the same number of
    records and the same category in every record; a field empty in one file only is a bad row.
    Frame: `id` ("<record>-<field>"), `record` (1-based), `field`, `category`, `en`, `ko`.
    """
    en_path, ko_path = Path(en_path), Path(ko_path)
    options = dict(fmt="jsonl", required=["instruction", "response", "category"],
                   optional=["context"], on_bad_row=on_bad_row)
    en, ko = read_table(en_path, **options), read_table(ko_path, **options)
    if en.rows_read != ko.rows_read:
        raise DataError(f"dolly files do not line up: {en_path} has {en.rows_read} records, "
                        f"{ko_path} has {ko.rows_read}")
    # Align by position among records; a record skipped in either file drops the pair.
    ko_rows = dict(zip(ko.row_index, ko.frame.iter_rows(named=True), strict=True))
    pairs, wheres, indices, skipped = [], [], [], list(en.skipped) + list(ko.skipped)
    for index, where, en_row in zip(en.row_index, en.row_where, en.frame.iter_rows(named=True),
                                    strict=True):
        ko_row = ko_rows.get(index)
        if ko_row is None:
            continue
        number = index + 1
        try:
            if en_row["category"] != ko_row["category"]:
                raise _RowError("category", f"{en_row['category']!r} here but "
                                            f"{ko_row['category']!r} in {ko_path}")
            found = []
            for field in DOLLY_TEXT_FIELDS:
                en_text, ko_text = en_row.get(field) or "", ko_row.get(field) or ""
                if not en_text.strip() and not ko_text.strip():
                    continue
                if not en_text.strip() or not ko_text.strip():
                    empty_in = en_path if not en_text.strip() else ko_path
                    raise _RowError(field, f"empty in {empty_in} only")
                found.append({"id": f"{number}-{field}", "record": number, "field": field,
                              "category": en_row["category"], "en": en_text, "ko": ko_text})
        except _RowError as err:
            bad = SkippedRow(en_path, where, err.field, err.reason)
            if on_bad_row == "error":
                raise DataError(str(bad)) from None
            skipped.append(bad)
            continue
        pairs += found
        wheres += [where] * len(found)
        indices += [index] * len(found)
    if not pairs:
        raise DataError(f"dolly files {en_path} and {ko_path}: no usable pairs")
    schema = {"id": pl.String, "record": pl.Int64, "field": pl.String, "category": pl.String,
              "en": pl.String, "ko": pl.String}
    return _Checked(pairs, wheres, indices, skipped, en.rows_read).result(schema)


def read_dolly_source(path: str | os.PathLike, language: str, *,
                      on_bad_row: str = "error") -> ReadResult:
    """One Dolly file alone (a blind test set: the texts to translate, no translation), split
    like `read_dolly_pairs` into its instruction, context and response texts. Frame: `id`
    ("<record>-<field>"), `record`, `field`, `category` and the text under `language`."""
    path = Path(path)
    table = read_table(path, fmt="jsonl", required=["instruction", "response", "category"],
                       optional=["context"], on_bad_row=on_bad_row)
    rows, wheres, indices = [], [], []
    for index, where, row in zip(table.row_index, table.row_where,
                                 table.frame.iter_rows(named=True), strict=True):
        for field in DOLLY_TEXT_FIELDS:
            text = row.get(field) or ""
            if text.strip():
                rows.append({"id": f"{index + 1}-{field}", "record": index + 1, "field": field,
                             "category": row["category"], language: text})
                wheres.append(where)
                indices.append(index)
    schema = {"id": pl.String, "record": pl.Int64, "field": pl.String, "category": pl.String,
              language: pl.String}
    return _Checked(rows, wheres, indices, list(table.skipped), table.rows_read).result(schema)


def _dig(values: dict[str, Any], *keys: str) -> Any:
    value: Any = values
    for depth, key in enumerate(keys):
        if not isinstance(value, dict):
            raise _RowError(".".join(keys[:depth]), f"expected an object, got {_type_name(value)}")
        if key not in value or value[key] is None:
            raise _RowError(".".join(keys[:depth + 1]), "missing field")
        value = value[key]
    return value


def _optional_text(values: dict[str, Any], *keys: str) -> str | None:
    try:
        value = _dig(values, *keys)
    except _RowError:
        return None
    return str(value)


def _dialogue(values: dict[str, Any]) -> dict[str, Any]:
    content = _dig(values, "talk", "content")
    if not isinstance(content, dict):
        raise _RowError("talk.content", f"expected an object, got {_type_name(content)}")
    utterances, ended_at = [], None
    exchange = 1
    while f"HS{exchange:02d}" in content:  # HS01, SS01, HS02, SS02, ... (three in practice)
        for key in (f"HS{exchange:02d}", f"SS{exchange:02d}"):
            value = content.get(key)
            text = "" if value is None else _text(f"talk.content.{key}", value, required=False)
            if not text.strip():
                ended_at = ended_at or key
                continue
            if ended_at:
                raise _RowError(f"talk.content.{key}", f"utterance after the dialogue ended "
                                                       f"(talk.content.{ended_at} is empty)")
            utterances.append(text.strip())
        exchange += 1
    if not utterances:
        raise _RowError("talk.content.HS01", "missing field" if "HS01" not in content
                        else "empty dialogue")
    if len(utterances) % 2:
        missing = f"SS{len(utterances) // 2 + 1:02d}"
        raise _RowError(f"talk.content.{missing}", "the last human utterance has no reply")
    return {"id": _optional_text(values, "talk", "id", "talk-id"),
            "emotion": _optional_text(values, "profile", "emotion", "type"),
            "turns": utterances}


def read_aihub_dialogue(path: str | os.PathLike, *, on_bad_row: str = "error") -> ReadResult:
    """AI Hub emotional dialogue corpus (감성 대화 말뭉치), the JSON release.

    A list of items, each with `profile.emotion.type` (e.g. "E18") and `talk.content` holding
    human (`HS01`, `HS02`, `HS03`) and system (`SS01`, `SS02`, `SS03`) utterances, empty
    strings once the dialogue has ended. Frame: `id` (`talk.id.talk-id`, else the record's
    1-based position), `emotion`, `turns` (the utterances, human first, alternating, stripped).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text, _ = _decode(path, path.read_bytes(), line_based=False, on_bad_row=on_bad_row)
    rows = _json_records(path, _load_json(path, text))
    checked = _collect(path, rows, _dialogue, on_bad_row)
    for record, index in zip(checked.records, checked.index, strict=True):
        record["id"] = record["id"] or str(index + 1)
    return checked.result({"id": pl.String, "emotion": pl.String,
                           "turns": pl.List(pl.String)})


def read_parallel(path: str | os.PathLike, *, languages: tuple[str, str] = ("ko", "en"),
                  columns: dict[str, str] | None = None, fmt: str | None = None,
                  labelled: bool = True, on_bad_row: str = "error") -> ReadResult:
    """AI Hub parallel corpus, Korean with English, Chinese or Japanese, from CSV/JSON/JSONL.

    `languages` is (source, target) as our column names; `columns` maps the file's columns
    to them, e.g. {"원문": "ko", "번역문": "en"} (the ko-en Excel sheets) or
    {"한국어": "ko", "중국어": "zh"}. Unlabelled files need only the source. Frame: `id` (the
    row's 1-based position among the records), then the language columns.
    """
    source, target = languages
    required = [source, target] if labelled else [source]
    result = read_table(path, required=required, columns=columns, fmt=fmt,
                        on_bad_row=on_bad_row)
    return with_row_ids(result)


def read_summarization(path: str | os.PathLike, *, columns: dict[str, str] | None = None,
                       fmt: str | None = None, labelled: bool = True,
                       on_bad_row: str = "error") -> ReadResult:
    """Summarization records: `document` and (when `labelled`) `summary`, both text.

    Expected shape (JSON lines, a JSON list, `{"data": [...]}`, CSV or TSV):
    `{"document": "...", "summary": "..."}`; map other names with `columns`, e.g.
    {"passage": "document", "summary1": "summary"}. Frame: `id` (the row's 1-based position
    among the records), `document`, `summary`.
    """
    required = ["document", "summary"] if labelled else ["document"]
    return with_row_ids(read_table(path, required=required, columns=columns, fmt=fmt,
                                    on_bad_row=on_bad_row))


def _squad_rows(path: Path, document: dict[str, Any]) -> Iterator[_RawRow]:
    """One row per question of a SQuAD-style document; the row is named by its JSON path."""
    for i, article in enumerate(document["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{i}].paragraphs: expected a list, "
                            f"got {_type_name(paragraphs)}")
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                yield _RawRow(where, None, "expected an object with a 'qas' list")
                continue
            for k, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, dict):
                    yield _RawRow(f"{where}.qas[{k}]", None, "expected a JSON object")
                    continue
                yield _RawRow(f"{where}.qas[{k}]", {"context": paragraph.get("context"), **qa})


def _squad_question(values: dict[str, Any], labelled: bool) -> dict[str, Any]:
    record = {"id": None if values.get("id") is None else str(values["id"]),
              "context": _text("context", values.get("context"), required=True),
              "question": _text("question", values.get("question"), required=True)}
    if labelled:
        answers = values.get("answers")
        if not isinstance(answers, list) or not answers:
            raise _RowError("answers", "no answer (missing, empty or not a list)")
        first = answers[0]
        text = first.get("text") if isinstance(first, dict) else None
        record["answer"] = _text("answers[0].text", text, required=True)
    return record


def read_qa(path: str | os.PathLike, *, columns: dict[str, str] | None = None,
            fmt: str | None = None, labelled: bool = True,
            on_bad_row: str = "error") -> ReadResult:
    """Question answering records: `context`, `question` and (when `labelled`) `answer`.

    Two shapes: flat rows (JSON lines, a JSON list, CSV, TSV) with those fields (rename with
    `columns`), or SQuAD-style JSON `{"data": [{"paragraphs": [{"context": ..., "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}]}]}]}]}` as AI Hub's machine reading
    comprehension sets ship, where the first answer is used. Frame: `id`, `context`,
    `question`, `answer`; flat rows get their 1-based position as id, SQuAD questions keep
    theirs.
    """
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "json" and path.is_file():
        text, _ = _decode(path, path.read_bytes(), line_based=False, on_bad_row=on_bad_row)
        document = _load_json(path, text)
        if _is_squad(document):
            rows = _squad_rows(path, document)
            checked = _collect(path, rows, lambda values: _squad_question(values, labelled),
                               on_bad_row)
            for record, where in zip(checked.records, checked.where, strict=True):
                record["id"] = record["id"] or where
            names = ("id", "context", "question", "answer") if labelled else \
                ("id", "context", "question")
            return checked.result({name: pl.String for name in names})
    required = ["context", "question", "answer"] if labelled else ["context", "question"]
    return with_row_ids(read_table(path, required=required, columns=columns, fmt=fmt,
                                    on_bad_row=on_bad_row))


def _is_squad(document: Any) -> bool:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return False
    return any(isinstance(a, dict) and "paragraphs" in a for a in document["data"])
