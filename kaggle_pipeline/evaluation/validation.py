"""Predictions against the truth: the one place classification and generation metrics are put
together, the decision threshold calibrated on validation, and the validation files.

Classification: accuracy, macro-F1, per-class F1 and the confusion matrix of a decision; with
label scores, of the decision task.decision asks (argmax, or a threshold), and in either case
the threshold on score(first label) - score(second label) that is best on this split, its
cross-fitted accuracy (each half's threshold fit on the other half: what calibration is worth on
unseen data) and the AUC. Generation: BLEU
(char tokens), chrF, chrF++, ROUGE on Hangul and the language-mismatch rate (metrics.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_pipeline.evaluation import metrics
from kaggle_pipeline.files import write_atomically
from kaggle_pipeline.inference.predictions import decide

VALIDATION_FILE = "validation_predictions.csv"
# task.metric -> the key of its value among the metrics below.
METRIC_KEYS = {"accuracy": "accuracy", "macro_f1": "macro_f1", "bleu": "bleu", "chrf": "chrf",
               "chrf++": "chrf_pp", "rouge_1": "rouge1", "rouge_2": "rouge2",
               "rouge_l": "rougeL", "rouge_l_char": "rougeL_char"}
# The script a translation's output should be in (metrics.is_script_mismatch); Japanese mixes
# Kana and Han, so it is left to the reference's dominant script.
TARGET_SCRIPTS = {"ko": "hangul", "en": "latin", "zh": "han"}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a report shows: the metrics table, the 0-1 scores of the per-task plot, and for
    classification the confusion matrix with its axes' label words."""

    kind: str  # "classification" | "generation"
    metrics: dict
    headline: dict[str, float]
    confusion: list[list[int]] | None = None
    labels: list[str] | None = None
    label_values: list[str] | None = None  # the labels as the files write them


# ----------------------------------------------------------------------------- classification


def best_threshold(margins: np.ndarray, positive: np.ndarray) -> float:
    """The cut on margin = score(positive) - score(negative) with the highest accuracy; ties go
    to the cut nearest 0 (the uncalibrated decision)."""
    values = np.sort(np.unique(margins))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    accuracy = np.array([np.mean((margins > c) == positive) for c in cuts])
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best]))]])


def cross_fitted_accuracy(margins: np.ndarray, positive: np.ndarray, folds: int = 2,
                          seed: int = 0) -> float:
    """Accuracy of the calibrated decision where each row's threshold was fit on the other
    folds only: an honest estimate of what calibration buys on unseen data."""
    order = np.random.default_rng(seed).permutation(len(margins))
    correct = 0
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        cut = best_threshold(margins[rest], positive[rest])
        correct += int(np.sum((margins[fold] > cut) == positive[fold]))
    return correct / len(margins)


def classification_metrics(truth: Sequence, predicted: Sequence, labels: Sequence,
                           names: Sequence[str] | None = None) -> dict:
    """n, accuracy, macro-F1, F1 per class (keyed by the label's word) and the confusion
    matrix (rows truth, columns prediction, in `labels` order)."""
    names = [str(n) for n in (names or labels)]
    per_class = metrics.per_class_f1(truth, predicted, labels=labels)
    result = {"n": len(truth), "accuracy": metrics.accuracy(truth, predicted),
              "macro_f1": metrics.macro_f1(truth, predicted, labels=labels)}
    result.update({f"f1[{name}]": per_class[label]
                   for label, name in zip(labels, names, strict=True)})
    result["confusion"] = metrics.confusion_matrix(truth, predicted, labels=labels).tolist()
    return result


def calibrated_classification(scores: np.ndarray, truth: Sequence, labels: Sequence,
                              names: Sequence[str] | None = None,
                              decision: str = "argmax") -> dict:
    """The metrics of `decision`: "argmax", or "threshold", the binary decision calibrated on
    this split (any other number of labels decides by argmax). With them `threshold` (the
    decision's: 0 for argmax), the uncalibrated `raw_accuracy`/`raw_macro_f1`, and for binary
    tasks the calibrated threshold, the accuracy of its decision cross-fitted on this split
    (`accuracy_cross_fitted`) and the `auc`."""
    raw = decide(scores, labels)
    raw_metrics = classification_metrics(truth, raw, labels, names)
    extra = {"decision": decision, "raw_accuracy": raw_metrics["accuracy"],
             "raw_macro_f1": raw_metrics["macro_f1"], "threshold": 0.0}
    if len(labels) != 2:
        return {**raw_metrics, **extra, "decision": "argmax"}
    margins = scores[:, 0] - scores[:, 1]
    positive = np.array([t == labels[0] for t in truth])
    extra["calibrated_threshold"] = best_threshold(margins, positive)
    extra["accuracy_cross_fitted"] = cross_fitted_accuracy(margins, positive)
    extra["auc"] = metrics.roc_auc(positive.astype(int), margins)
    if decision != "threshold":
        return {**raw_metrics, **extra}
    extra["threshold"] = extra["calibrated_threshold"]
    calibrated = decide(scores, labels, extra["threshold"])
    return {**classification_metrics(truth, calibrated, labels, names), **extra}


def classification_evaluation(values: dict, names: Sequence[str],
                              label_values: Sequence | None = None) -> Evaluation:
    """The report of `classification_metrics` (or `calibrated_classification`) values."""
    table = report_table({k: v for k, v in values.items() if k != "confusion"})
    return Evaluation("classification", table,
                      {"accuracy": values["accuracy"], "macro_f1": values["macro_f1"]},
                      values["confusion"], [str(n) for n in names],
                      None if label_values is None else [str(v) for v in label_values])


# ----------------------------------------------------------------------------- generation


def expected_script(target_lang: str | None) -> str | None:
    """The script a translation must answer in; None: the reference's own dominant script."""
    return TARGET_SCRIPTS.get(target_lang) if target_lang else None


def generation_metrics(predictions: Sequence[str], references: Sequence[str],
                       target_lang: str | None = None) -> dict:
    """BLEU (char tokens), chrF, chrF++, ROUGE on Hangul, and the language-mismatch rate."""
    scores = metrics.generation_scores(list(predictions), list(references),
                                       expected_script=expected_script(target_lang))
    return {"n": len(predictions), **scores, "bleu_signature": metrics.bleu_signature()}


def generation_evaluation(values: dict) -> Evaluation:
    """The report of `generation_metrics` values; the plot's scores all on 0-1."""
    headline = {"BLEU/100": values["bleu"] / 100, "chrF/100": values["chrf"] / 100,
                "ROUGE-L": values["rougeL"], "ROUGE-L (char)": values["rougeL_char"],
                "language mismatch": values["mismatch_rate"]}
    return Evaluation("generation", {**report_table(values),
                                     "bleu_signature": values["bleu_signature"]}, headline)


def with_headline(values: dict, metric: str | None) -> dict:
    """The metrics with the competition's own first: `metric` (its name) and `score`."""
    if not metric:
        return values
    return {"metric": metric, "score": values[METRIC_KEYS[metric]], **values}


def report_table(values: dict) -> dict:
    """The numbers of a result for a report's table, the competition's metric first."""
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))
               and not isinstance(v, bool) and k != "score"}
    if "metric" in values:
        return {f"{values['metric']} (task.metric)": values["score"], **numbers}
    return numbers


# ----------------------------------------------------------------------------- files


def write_table(path: Path, columns: dict[str, Sequence]) -> Path:
    """A CSV of text columns, written atomically."""
    frame = pl.DataFrame({name: [str(v) for v in values] for name, values in columns.items()},
                         schema={name: pl.String for name in columns})
    write_atomically(path, lambda tmp: frame.write_csv(tmp))
    return path
