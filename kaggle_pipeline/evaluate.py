"""Score predictions against references; write a Markdown report with PNG plots.

    python -m kaggle_pipeline.evaluate [--config run.toml] [section.key=value ...] [--out DIR]
    python -m kaggle_pipeline.evaluate --predictions P [--references R] [--task NAME |
        --config run.toml] [--kind classification|generation] [--run RUN_DIR] [--out DIR]

Files. `P` is a CSV/TSV with an `id` column: a submission (the predictions are its last
column, e.g. `label` or `ko`) or a run's `validation_predictions.csv` (column `prediction`, and
`reference`, so `--references` may then be left out). With `--task`, `R` is read with the
task's own reader (a labelled TSV for tarr-sentiment, the JSON of aihub-dialogue, the Dolly pair
"en.jsonl,ko.jsonl", ...) and the references are the examples' labels or answers. Without it `R`
is a CSV/TSV with `id` and the prediction column's name (or a single other column). Every
reference id needs exactly one prediction. The kind is the task's; without a task it is
classification when every prediction is one of at most 20 reference values that repeat, else
generation (`--kind` decides otherwise). `--run` adds the run's training loss curve.

Config. `--config` evaluates a finished run on its validation split (the same split as
training: same file, seed and fraction), writes `<run dir>/validation_predictions.csv` and the
report with the loss curve to `<run dir>/evaluation/`.

Classification reports accuracy, macro-F1, per-class F1 and the confusion matrix; generation
BLEU (char tokens), chrF, chrF++, ROUGE-1/2/L on words and characters (Hangul kept) and the
language-mismatch rate, wrong-script outputs scoring 0 (metrics.py). The report goes to `--out`,
by default a folder `<predictions stem>-report/` beside the predictions.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from kaggle_pipeline import run_setup
from kaggle_pipeline.cli import log, run_command
from kaggle_pipeline.data.tasks import TASK_NAMES
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.evaluation import validation
from kaggle_pipeline.evaluation.report import write_report
from kaggle_pipeline.evaluation.validation import Evaluation

KINDS = ("classification", "generation")
MAX_CLASSES = 20  # more distinct references than this is not a label set
ID_COLUMN = "id"


class EvaluationError(UserError):
    """Predictions and references that cannot be scored together; names file, row and field."""


# ----------------------------------------------------------------------------- reading


def _read_text_table(path: Path, what: str):
    from kaggle_pipeline.submission import read_sample

    if not path.is_file():
        raise EvaluationError(f"{path}: no such {what} file")
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise EvaluationError(f"{path}: {what} must be a .csv or .tsv file (or give --task to "
                              "read references with the task's reader)")
    try:
        frame = read_sample(path)
    except Exception as err:  # noqa: BLE001 -- polars raises several kinds for a broken file
        raise EvaluationError(f"{path}: cannot read it as a "
                              f"{path.suffix.lstrip('.').upper()} file ({err})") from None
    if ID_COLUMN not in frame.columns:
        raise EvaluationError(f"{path}: no column {ID_COLUMN!r}; the file has columns: "
                              f"{', '.join(repr(c) for c in frame.columns)}"
                              f"{_separator_hint(path, frame.columns)}")
    return frame


def _separator_hint(path: Path, columns: Sequence[str]) -> str:
    """A header read as one column holding the other separator: the file's format is not its
    suffix's."""
    if len(columns) != 1:
        return ""
    other = {".tsv": (",", "comma", ".csv"), ".csv": ("\t", "tab", ".tsv")}.get(
        path.suffix.lower())
    if other and other[0] in columns[0]:
        return (f" (one column holding {other[1]}s: the file is {other[1]}-separated; name it "
                f"{path.with_suffix(other[2]).name} or save it with the separator its suffix "
                "says)")
    return ""


def _keyed(path: Path, ids: Sequence, values: Sequence, field: str) -> dict[str, str]:
    """id -> value, refusing empty and repeated ids."""
    keyed: dict[str, str] = {}
    first: dict[str, int] = {}
    for row, (key, value) in enumerate(zip(ids, values, strict=True), start=1):
        key = "" if key is None else str(key)
        if not key:
            raise EvaluationError(f"{path}: data row {row}, field {ID_COLUMN!r}: empty id")
        if key in keyed:
            raise EvaluationError(f"{path}: data rows {first[key]} and {row}, field "
                                  f"{ID_COLUMN!r}: duplicate id {key!r}")
        if value is None:
            raise EvaluationError(f"{path}: data row {row} (id {key!r}), field {field!r}: "
                                  "empty value")
        keyed[key], first[key] = str(value), row
    return keyed


def read_predictions(path: Path, column: str | None = None) -> tuple[dict[str, str], str]:
    """(id -> prediction, the column they came from): `column`, else `prediction`, else the
    last column."""
    frame = _read_text_table(path, "predictions")
    if column is None:
        column = "prediction" if "prediction" in frame.columns else frame.columns[-1]
    if column not in frame.columns or column == ID_COLUMN:
        raise EvaluationError(f"{path}: no prediction column {column!r} (columns: "
                              f"{frame.columns})")
    return _keyed(path, frame[ID_COLUMN].to_list(), frame[column].to_list(), column), column


def read_references(path: Path, column: str) -> dict[str, str]:
    """id -> reference from a CSV/TSV: the column `column`, `reference`, or the only other."""
    frame = _read_text_table(path, "references")
    others = [c for c in frame.columns if c != ID_COLUMN]
    if column in frame.columns and column != ID_COLUMN:
        chosen = column
    elif "reference" in frame.columns:
        chosen = "reference"
    elif len(others) == 1:
        chosen = others[0]
    else:
        raise EvaluationError(f"{path}: no column {column!r} or 'reference', and {len(others)} "
                              f"candidate columns {others}; give --task to read it")
    return _keyed(path, frame[ID_COLUMN].to_list(), frame[chosen].to_list(), chosen)


def task_references(spec, path: str | os.PathLike) -> dict[str, str]:
    """id -> label (classification) or answer (generation), read with the task's reader."""
    from kaggle_pipeline.data.tasks import build_examples, load_records

    table = load_records(spec, run_setup.input_paths(spec, str(path), "--references"))
    examples = build_examples(spec, table.frame)
    values = [e.label if spec.kind == "classification" else e.answer for e in examples]
    return _keyed(Path(str(path).split(",")[0]), [e.id for e in examples], values,
                  spec.label_column or "answer")


def align(predictions: dict[str, str], references: dict[str, str], predictions_path: Path,
          column: str) -> tuple[list[str], list[str], list[str]]:
    """(ids, predictions, references) in the references' order; every reference needs a
    prediction and every prediction a reference."""
    missing = [i for i in references if i not in predictions]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise EvaluationError(f"{predictions_path}: field {ID_COLUMN!r}: {len(missing)} "
                              f"reference ids have no prediction: {shown}")
    extra = [i for i in predictions if i not in references]
    if extra:
        shown = ", ".join(repr(i) for i in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise EvaluationError(f"{predictions_path}: field {ID_COLUMN!r}: {len(extra)} ids are "
                              f"not among the references: {shown}")
    ids = list(references)
    return ids, [predictions[i] for i in ids], [references[i] for i in ids]


MAX_LABEL_LENGTH = 30  # longer values are texts, not label names


def infer_kind(predictions: Sequence[str], references: Sequence[str],
               where: str = "the files") -> str:
    """Classification when the values are a few short labels (at most MAX_CLASSES, repeated or
    whole numbers), generation when they are texts (long, of several words, or many different
    ones); refuses to guess in between."""
    values = set(references) | set(predictions)
    texts = any(len(v) > MAX_LABEL_LENGTH or len(v.split()) > 2 for v in values)
    if texts or len(values) > MAX_CLASSES:
        return "generation"
    if len(values) < len(references) or all(v.strip().lstrip("-").isdigit() for v in values):
        return "classification"
    raise EvaluationError(f"{where}: cannot tell whether {sorted(values)[:5]} are labels or "
                          "texts; give --kind classification|generation or --task")


# ----------------------------------------------------------------------------- scoring


def score_classification(predictions: Sequence[str], references: Sequence[str],
                         labels: Sequence[str] | None = None,
                         names: Sequence[str] | None = None,
                         metric: str | None = None) -> Evaluation:
    """`labels` fixes the label set and order (a task's label map); `names` how they are
    shown. A prediction outside an explicit label set is refused."""
    if labels is None:
        labels = sorted(set(references) | set(predictions))
    labels = [str(label) for label in labels]
    outside = sorted({p for p in predictions if p not in labels})
    if outside:
        raise EvaluationError(f"predictions {outside} are not labels of the task ({labels})")
    names = [str(n) for n in (names or labels)]
    values = validation.classification_metrics(references, predictions, labels, names)
    return validation.classification_evaluation(validation.with_headline(values, metric), names,
                                                labels)


def score_generation(predictions: Sequence[str], references: Sequence[str],
                     spec=None) -> Evaluation:
    values = validation.generation_metrics(predictions, references,
                                           spec.target_lang if spec is not None else None)
    return validation.generation_evaluation(
        validation.with_headline(values, spec.metric if spec is not None else None))


def score(kind: str, predictions: Sequence[str], references: Sequence[str], spec=None
          ) -> Evaluation:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "generation":
        return score_generation(predictions, references, spec)
    if spec is not None and spec.label_map:
        return score_classification(predictions, references, list(spec.label_map),
                                    list(spec.label_map.values()), spec.metric)
    return score_classification(predictions, references)


# ----------------------------------------------------------------------------- report


def write_evaluation(out_dir: str | os.PathLike, evaluation: Evaluation, *, task: str,
                     title: str, run_dir: str | os.PathLike | None = None) -> Path:
    """report.md + confusion_matrix.png (classification) + per_task.png, and loss_curve.png
    when `run_dir` holds a metrics.jsonl with losses."""
    loss = None
    if run_dir is not None:
        loss = Path(run_dir) / "metrics.jsonl"
        if not loss.is_file():
            raise EvaluationError(f"{run_dir}: no metrics.jsonl (not a training run directory)")
    return write_report(out_dir, metrics=evaluation.metrics, confusion=evaluation.confusion,
                        labels=evaluation.labels, label_values=evaluation.label_values,
                        loss_curve_jsonl=loss,
                        per_task={task: evaluation.headline}, title=title)


def evaluate_files(predictions: str | os.PathLike, references: str | None = None, *,
                   task: str | None = None, kind: str | None = None,
                   run_dir: str | os.PathLike | None = None,
                   out: str | os.PathLike | None = None, spec=None) -> Path:
    """Score a predictions file against references and write the report; returns its path.
    The task is `spec` (a run config's), else the built-in `task`, else none."""
    from kaggle_pipeline.data.tasks import get_task

    predictions = Path(predictions)
    if spec is None and task:
        spec = get_task(task)
    columns = _read_text_table(predictions, "predictions").columns
    column = None
    if spec is not None:
        from kaggle_pipeline.submission import answer_column

        column = answer_column(spec) if answer_column(spec) in columns else None
    predicted, column = read_predictions(predictions, column)
    if references is None:
        if "reference" not in columns:
            raise EvaluationError(f"{predictions}: no 'reference' column; give --references")
        referenced = read_references(predictions, "reference")
    elif spec is not None:
        referenced = task_references(spec, references)
    else:
        referenced = read_references(Path(references), column)
    ids, hyps, refs = align(predicted, referenced, predictions, column)
    if spec is not None:
        kind = kind or spec.kind
    kind = kind or infer_kind(hyps, refs, f"{predictions} and {references or predictions}")
    evaluation = score(kind, hyps, refs, spec)
    name = spec.name if spec else predictions.stem
    out = Path(out) if out else predictions.parent / f"{predictions.stem}-report"
    title = f"{predictions.name} ({kind}, {len(ids)} examples)"
    title = title if name == predictions.stem else f"{name}: {title}"
    return write_evaluation(out, evaluation, task=name, title=title, run_dir=run_dir)


def validation_examples(cfg, spec) -> list:
    """The run's validation split, exactly as training drew it."""
    _, valid = run_setup.read_examples(cfg, spec)
    if not valid:
        raise EvaluationError(f"{cfg.data.train}: the validation split is empty "
                              f"(data.validation_fraction = {cfg.data.validation_fraction})")
    return valid


def evaluate_run(cfg, out: str | os.PathLike | None = None) -> Path:
    """Predict a finished run's validation split and write the report (with its loss curve)."""
    from kaggle_pipeline import predict

    spec = run_setup.task_spec(cfg)
    run_setup.trained_path(cfg)  # a run that saved nothing fails before the data is read
    run_setup.check_trained_from(cfg, spec)
    examples = validation_examples(cfg, spec)
    limit = run_setup.validation_size(cfg, spec)
    examples = examples[:limit] if limit is not None else examples
    model, variables, tokenizer = run_setup.load_trained(cfg, spec.style)
    run_setup.check_tokenizer(tokenizer, model.config, spec.style)
    if spec.kind == "classification":
        log(f"scoring {len(examples)} validation examples")
        result, decided = predict.validate_classification(model, variables, tokenizer, spec,
                                                          examples, cfg)
        truth = [e.label for e in examples]
        validation.write_table(cfg.run_dir / validation.VALIDATION_FILE, {
            "id": [e.id for e in examples], "prediction": decided, "reference": truth})
        evaluation = validation.classification_evaluation(result, list(spec.label_map.values()),
                                                          list(spec.label_map))
    else:
        evaluation = validation.generation_evaluation(predict.validate_generation(
            model, variables, tokenizer, spec, examples, cfg))
    out = Path(out) if out else cfg.run_dir / "evaluation"
    title = predict.report_title(cfg, spec, f"validation, {evaluation.metrics['n']} examples")
    has_losses = (cfg.run_dir / "metrics.jsonl").is_file()
    return write_evaluation(out, evaluation, task=spec.name, title=title,
                            run_dir=cfg.run_dir if has_losses else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaggle_pipeline.evaluate",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, help="CSV/TSV with an id column")
    parser.add_argument("--references", help="the references (with --task: the task's file)")
    parser.add_argument("--task", choices=TASK_NAMES,
                        help="a built-in task: its reader, label set and kind")
    parser.add_argument("--kind", choices=KINDS, help="override the kind")
    parser.add_argument("--run", type=Path, help="a run directory: adds its loss curve")
    parser.add_argument("--config", help="a run config: without --predictions, evaluate its "
                        "run's validation split (default: the main job's); with it, its task")
    parser.add_argument("--out", type=Path, help="report directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value of the run config")
    args = parser.parse_args(argv)
    if args.predictions is None:
        for flag in ("references", "task", "kind", "run"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} goes with --predictions")
    if args.task and (args.config or args.overrides):
        parser.error("give the task by --task or by the run config, not both")
    from kaggle_pipeline.run_config import load_config

    def body() -> None:
        if args.predictions is None:
            report = evaluate_run(load_config(args.config, args.overrides), args.out)
        else:
            spec = None
            if args.config or args.overrides:
                spec = run_setup.task_spec(load_config(args.config, args.overrides))
            report = evaluate_files(args.predictions, args.references, task=args.task,
                                    kind=args.kind, run_dir=args.run, out=args.out, spec=spec)
        print(f"report: {report}")

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
