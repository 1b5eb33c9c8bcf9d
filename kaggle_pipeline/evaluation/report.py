"""A Markdown evaluation report with PNG plots beside it.

Plots are drawn on matplotlib's Agg canvas directly (no pyplot), so writing a report changes no
global matplotlib state and needs no display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kaggle_pipeline.files import write_atomically

REPORT_NAME = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
PER_TASK_PNG = "per_task.png"
LOSS_PNG = "loss_curve.png"

_CJK_FONTS = ("Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Malgun Gothic",
              "AppleGothic", "UnDotum", "Noto Sans CJK JP", "Noto Sans CJK SC")


def _cjk_font() -> str | None:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in _CJK_FONTS if name in installed), None)


def _needs_cjk(text: str) -> bool:
    return any(ord(c) >= 0x1100 for c in text)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                   bbox_inches="tight"))


def read_loss_curve(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(steps, losses) from a metrics JSON-lines file; lines without `loss` (e.g. eval records)
    are skipped."""
    path = Path(path)
    steps, losses = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or "loss" not in record:
                continue
            for field in ("step", "loss"):
                value = record.get(field)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{path}: line {line_no}, field {field!r}: expected a "
                                     f"number, got {value!r}")
            steps.append(float(record["step"]))
            losses.append(float(record["loss"]))
    if not losses:
        raise ValueError(f"{path}: no line has a 'loss' field")
    return steps, losses


def confusion_ticks(labels: Sequence[str], values: Sequence | None,
                    cjk_font: str | None) -> list[str]:
    """The axis labels: the label words, with the file's label values when they differ
    ("1 긍정"); only the values when the words need a CJK font that is not installed (the
    report then says which word each value stands for)."""
    words = [str(w) for w in labels]
    values = [str(v) for v in values] if values is not None else words
    if cjk_font is None and any(_needs_cjk(w) for w in words):
        return values if values != words else [str(i) for i in range(len(words))]
    return [w if v == w else f"{v} {w}" for v, w in zip(values, words, strict=True)]


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path,
                   values: Sequence | None = None) -> list[str]:
    """Draw the matrix with the label words (and the file's values) on its axes; returns the
    tick labels used."""
    font = _cjk_font()
    ticks = confusion_ticks(labels, values, font)
    size = max(4.0, 0.6 * len(ticks) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right", family=font or "sans-serif")
    ax.set_yticks(range(len(ticks)), ticks, family=font or "sans-serif")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(ticks) <= 30:  # beyond that the numbers do not fit
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    ax.set_title("Confusion matrix")
    _save(fig, path)
    return ticks


def plot_per_task(per_task: Mapping[str, Mapping[str, float]], path: Path) -> None:
    tasks = list(per_task)
    metric_names = sorted({m for scores in per_task.values() for m in scores})
    width = 0.8 / max(len(metric_names), 1)
    fig = Figure(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(metric_names) / 2)), 4))
    ax = fig.add_subplot()
    for k, metric in enumerate(metric_names):
        values = [per_task[t].get(metric, math.nan) for t in tasks]
        ax.bar(np.arange(len(tasks)) + k * width - 0.4 + width / 2, values, width, label=metric)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("Metrics per task")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def plot_loss(steps: Sequence[float], losses: Sequence[float], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(steps, losses, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines


def write_report(out_dir: str | os.PathLike, *, metrics: Mapping[str, object],
                 confusion: Sequence[Sequence[int]] | np.ndarray | None = None,
                 labels: Sequence | None = None, label_values: Sequence | None = None,
                 loss_curve_jsonl: str | os.PathLike | None = None,
                 per_task: Mapping[str, Mapping[str, float]] | None = None,
                 title: str = "Evaluation report") -> Path:
    """Write `report.md` and its PNGs into `out_dir`; returns the report's path. `labels` are
    the words of the confusion matrix's classes, `label_values` their values in the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "## Metrics", ""]
    lines += _table(["metric", "value"], list(metrics.items()))

    if confusion is not None:
        matrix = np.asarray(confusion)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"confusion must be a square matrix, got shape {matrix.shape}")
        names = [str(x) for x in (labels if labels is not None else range(len(matrix)))]
        if len(names) != len(matrix):
            raise ValueError(f"{len(names)} labels for a {len(matrix)}x{len(matrix)} confusion")
        ticks = plot_confusion(matrix, names, out_dir / CONFUSION_PNG, label_values)
        lines += ["", "## Confusion matrix", "", f"![Confusion matrix]({CONFUSION_PNG})", ""]
        if any(n not in t for t, n in zip(ticks, names, strict=True)):
            lines += ["The axes show the labels' values: "
                      + ", ".join(f"{t} = {n}" for t, n in zip(ticks, names, strict=True)), ""]
        lines += _table(["true \\ predicted", *names],
                        [[n, *row] for n, row in zip(names, matrix.tolist(), strict=True)])

    if per_task:
        plot_per_task(per_task, out_dir / PER_TASK_PNG)
        metric_names = sorted({m for scores in per_task.values() for m in scores})
        lines += ["", "## Metrics per task", "", f"![Metrics per task]({PER_TASK_PNG})", ""]
        lines += _table(["task", *metric_names],
                        [[t, *(scores.get(m, "") for m in metric_names)]
                         for t, scores in per_task.items()])

    if loss_curve_jsonl is not None:
        steps, losses = read_loss_curve(loss_curve_jsonl)
        plot_loss(steps, losses, out_dir / LOSS_PNG)
        lines += ["", "## Training loss", "", f"![Training loss]({LOSS_PNG})", "",
                  f"{len(losses)} points from step {steps[0]:g} to {steps[-1]:g}: first "
                  f"{losses[0]:.4f}, last {losses[-1]:.4f}, min {min(losses):.4f}."]

    report = out_dir / REPORT_NAME
    text = "\n".join(lines) + "\n"
    write_atomically(report, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return report
