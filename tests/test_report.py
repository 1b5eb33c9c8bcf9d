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


def test_confusion_axes_show_the_labels_as_the_data_writes_them(tmp_path, monkeypatch):
    from kaggle_pipeline.evaluation import report

    # With a font for the words: value and word; without one: the file's values, never 0/1
    # positions that the data may use the other way round.
    assert report.confusion_ticks(["긍정", "부정"], [1, 0], "Noto Sans CJK KR") == [
        "1 긍정", "0 부정"]
    assert report.confusion_ticks(["긍정", "부정"], [1, 0], None) == ["1", "0"]
    assert report.confusion_ticks(["pos", "neg"], [1, 0], None) == ["1 pos", "0 neg"]
    assert report.confusion_ticks(["cat", "dog"], ["cat", "dog"], None) == ["cat", "dog"]
    monkeypatch.setattr(report, "_cjk_font", lambda: None)
    text = write_report(tmp_path, metrics={}, confusion=[[3, 1], [0, 4]],
                        labels=["긍정", "부정"], label_values=[1, 0]).read_text()
    assert "The axes show the labels' values: 1 = 긍정, 0 = 부정" in text
    assert "| 긍정 | 3 | 1 |" in text


def test_the_report_title_names_the_task_once():
    from kaggle_pipeline.predict import report_title
    from kaggle_pipeline.run_config import load_config
    from kaggle_pipeline.run_setup import task_spec

    main_job = load_config(None)
    assert report_title(main_job, task_spec(main_job)) == "tarr-sentiment"
    seed = load_config(None, ["output.name=s1"])
    assert report_title(seed, task_spec(seed), "validation") == "s1 (tarr-sentiment): validation"
