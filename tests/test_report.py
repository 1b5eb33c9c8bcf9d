"""The Markdown report and its plots."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib import image as mpimg

from kaggle_pipeline.evaluation.report import read_loss_curve, write_report


def _write_loss(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


def test_report_writes_plots_and_references_them(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_loss(log, [{"step": s, "loss": 3.0 / (s + 1)} for s in range(50)]
                + [{"step": 50, "eval_accuracy": 0.8}])
    report = write_report(
        tmp_path / "out",
        metrics={"accuracy": 0.8125, "macro_f1": 0.79, "n": 100},
        confusion=[[40, 10], [9, 41]], labels=["부정", "긍정"],
        loss_curve_jsonl=log,
        per_task={"tarr-sentiment": {"accuracy": 0.81, "macro_f1": 0.79},
                  "dolly-en-ko": {"chrf": 0.41}},
    )
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert linked == ["confusion_matrix.png", "per_task.png", "loss_curve.png"]
    for name in linked:
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = mpimg.imread(png).shape
        assert height > 100 and width > 100
    assert "| accuracy | 0.8125 |" in text and "| n | 100 |" in text
    assert "| 부정 | 40 | 10 |" in text and "| 긍정 | 9 | 41 |" in text
    assert "| dolly-en-ko |  | 0.4100 |  |" in text
    assert "50 points from step 0 to 49: first 3.0000, last 0.0600" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion_matrix.png", "loss_curve.png", "per_task.png", "report.md"]


def test_report_with_metrics_only_has_no_images(tmp_path):
    report = write_report(tmp_path, metrics={"bleu": 12.5})
    assert "![" not in report.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_loss_reader_errors_name_file_line_and_field(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2: not JSON"):
        read_loss_curve(log)
    log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": "x", "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3, field 'step'"):
        read_loss_curve(log)
    log.write_text('{"step": 1, "accuracy": 2.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no line has a 'loss' field"):
        read_loss_curve(log)


def test_loss_reader_values(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_loss(log, [{"step": 10, "loss": 1.5}, {"step": 20, "eval_loss": 9},
                      {"step": 30, "loss": 1.25}])
    assert read_loss_curve(log) == ([10.0, 30.0], [1.5, 1.25])


def test_confusion_shape_errors(tmp_path):
    with pytest.raises(ValueError, match="square"):
        write_report(tmp_path, metrics={}, confusion=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3 labels for a 2x2"):
        write_report(tmp_path, metrics={}, confusion=np.eye(2), labels=["a", "b", "c"])
