"""Submission files: exact sample format, refusals with clear errors, atomic writes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO

from kaggle_pipeline import submission
from kaggle_pipeline.submission import SubmissionError, submission_path, write_submission

TARR_SAMPLE = REPO / "data" / "tarr" / "test.tsv"


def _tarr_predictions(order=None) -> pl.DataFrame:
    sample = submission.read_sample(TARR_SAMPLE)
    ids = [int(i) for i in sample["id"]]
    if order is not None:
        ids = order(ids)
    return pl.DataFrame({"id": ids, "label": [i % 2 for i in ids]})


def test_tarr_submission_is_the_sample_plus_a_label_column(tmp_path):
    out = tmp_path / "tarr.tsv"
    # Predictions in reverse order with int ids: the file follows the sample's order.
    preds = _tarr_predictions(order=lambda ids: ids[::-1])
    write_submission(preds, out, sample=TARR_SAMPLE, id_col="id", label_col="label",
                     label_domain=[0, 1])
    sample_lines = TARR_SAMPLE.read_text(encoding="utf-8").splitlines()
    out_lines = out.read_text(encoding="utf-8").splitlines()
    assert out_lines[0] == "id\tcomment\tlabel"
    assert len(out_lines) == len(sample_lines) == 101
    for sample_line, out_line in zip(sample_lines[1:], out_lines[1:], strict=True):
        sample_id = sample_line.split("\t")[0]
        assert out_line == f"{sample_line}\t{int(sample_id) % 2}"
    # The duplicated comments of the sample stay (ids are unique, comments need not be).
    comments = [line.split("\t")[1] for line in out_lines[1:]]
    assert len(set(comments)) < len(comments)


def test_csv_sample_with_label_column_keeps_its_columns_and_quoting(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text('text,id,label\n"a, b",007,x\nplain,3,x\n', encoding="utf-8")
    out = tmp_path / "sub.csv"
    preds = pl.DataFrame({"id": ["3", "007"], "label": ["neg", "pos"], "extra": [1, 2]})
    write_submission(preds, out, sample=sample, id_col="id", label_col="label",
                     label_domain={"pos", "neg"})
    assert out.read_text(encoding="utf-8") == 'text,id,label\n"a, b",007,pos\nplain,3,neg\n'


def test_sample_dataframe_uses_path_extension(tmp_path):
    sample = pl.DataFrame({"id": ["1", "2"]})
    preds = pl.DataFrame({"id": [2, 1], "label": ["번역 둘", "번역 하나"]})
    out = write_submission(preds, tmp_path / "s.tsv", sample=sample, id_col="id",
                           label_col="label", label_domain=None)
    assert out.read_text(encoding="utf-8") == "id\tlabel\n1\t번역 하나\n2\t번역 둘\n"


@pytest.mark.parametrize(
    ("preds", "message"),
    [
        (pl.DataFrame({"id": [1, 2], "label": [0, 1]}),
         r"98 ids of .*test\.tsv have no prediction \(field 'id'\): '3', '4'"),
        (pl.DataFrame({"id": list(range(1, 101)) + [555], "label": [0] * 101}),
         r"1 ids are not in .*test\.tsv \(field 'id'\): '555'"),
        (pl.DataFrame({"id": list(range(1, 101)) + [7], "label": [0] * 101}),
         r"rows 6 and 100, field 'id': duplicate id '7'"),
        (pl.DataFrame({"id": list(range(1, 101)), "label": [0] * 41 + [None] + [0] * 58}),
         r"row 41 \(id '42'\), field 'label': null label"),
        (pl.DataFrame({"id": list(range(1, 101)), "label": [0] * 9 + [2] + [1] * 90}),
         r"row 9 \(id '10'\), field 'label': label '2' is not one of \['0', '1'\]"),
        (pl.DataFrame({"id": list(range(1, 101)), "pred": [0] * 100}),
         r"predictions: no column 'label'"),
    ],
)
def test_refusals_name_row_and_field_and_write_nothing(tmp_path, preds, message):
    out = tmp_path / "sub.tsv"
    out.write_text("previous submission\n", encoding="utf-8")
    with pytest.raises(SubmissionError, match=message):
        write_submission(preds, out, sample=TARR_SAMPLE, id_col="id", label_col="label",
                         label_domain=[0, 1])
    assert out.read_text(encoding="utf-8") == "previous submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.tsv"]


def test_float_labels_are_outside_an_int_domain(tmp_path):
    preds = _tarr_predictions().with_columns(pl.col("label").cast(pl.Float64))
    with pytest.raises(SubmissionError,
                       match=r"row 0 \(id '1'\), field 'label': label '1\.0' is not one of"):
        write_submission(preds, tmp_path / "s.tsv", sample=TARR_SAMPLE, id_col="id",
                         label_col="label", label_domain=[0, 1])


def test_duplicate_sample_ids_and_tabs_in_tsv_cells_are_refused(tmp_path):
    sample = tmp_path / "sample.tsv"
    sample.write_text("id\ttext\n1\ta\n1\tb\n", encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"sample\.tsv: rows 0 and 1, field 'id'"):
        write_submission(pl.DataFrame({"id": [1], "label": ["x"]}), tmp_path / "o.tsv",
                         sample=sample, id_col="id", label_col="label", label_domain=None)
    sample.write_text("id\n1\n", encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"row 0, field 'label': .*tab or line break"):
        write_submission(pl.DataFrame({"id": [1], "label": ["a\tb"]}), tmp_path / "o.tsv",
                         sample=sample, id_col="id", label_col="label", label_domain=None)
    assert not (tmp_path / "o.tsv").exists()


def test_crash_during_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "sub.tsv"
    out.write_text("previous submission\n", encoding="utf-8")

    def half_write(self, file, **kwargs):
        Path(file).write_text("id\tcomment\tla", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_csv", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_submission(_tarr_predictions(), out, sample=TARR_SAMPLE, id_col="id",
                         label_col="label", label_domain=[0, 1])
    assert out.read_text(encoding="utf-8") == "previous submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.tsv"]


def test_submission_path():
    now = dt.datetime(2025, 3, 4, 5, 6, 7)
    assert submission_path("tarr-sentiment", "tsv", now) == Path(
        "submissions/tarr-sentiment-20250304-050607.tsv")
    assert submission_path("dolly", ".csv", now, root="/tmp/x") == Path(
        "/tmp/x/dolly-20250304-050607.csv")
    with pytest.raises(ValueError, match="extension 'json'"):
        submission_path("t", "json", now)
    with pytest.raises(ValueError, match="output.name '../evil': a submission name must be"):
        submission_path("../evil", "csv", now)


def test_a_sample_submission_fixes_rows_columns_and_the_answer_column(tmp_path):
    from kaggle_pipeline.data.tasks import define_task
    from kaggle_pipeline.submission import write_task_submission

    test = tmp_path / "test.csv"
    test.write_text("id,text\nb7,x\na3,y\n", encoding="utf-8")
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("id,target,Usage\na3,0,Public\nb7,0,Private\n", encoding="utf-8")
    fields = dict(kind="classification", prompt="{text}", label_column="label",
                  label_map={"1": "yes", "0": "no"}, sample_submission=str(sample))
    # The train file's label column is 'label', the sample's prediction column 'target'.
    with pytest.raises(SubmissionError, match=r"sample_submission.csv: no column 'label' for the "
                                              r"predictions \(columns: id, target, Usage\); "
                                              r"name it with task.submission_columns"):
        write_task_submission(define_task(None, "c", **fields), test, tmp_path / "s",
                              ["b7", "a3"], ["1", "0"], run_name="c")
    spec = define_task(None, "c", **fields, output_columns=("id", "target"))
    path = write_task_submission(spec, test, tmp_path / "s", ["b7", "a3"], ["1", "0"],
                                 run_name="c")
    assert path.read_text().splitlines() == ["id,target,Usage", "a3,0,Public", "b7,1,Private"]
    with pytest.raises(SubmissionError, match=r"1 test ids are not in .*sample_submission.csv: "
                                              r"'c9'"):
        write_task_submission(spec, test, tmp_path / "s", ["b7", "a3", "c9"], ["1", "0", "1"])
    assert [p.name for p in (tmp_path / "s").iterdir()] == [path.name]
