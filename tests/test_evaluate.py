"""`python -m kaggle_pipeline.evaluate`: metrics against hand-counted values, the report and its
PNGs, ROUGE on Hangul, errors that name the file, row and field, and a run's validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest

from kaggle_pipeline import evaluate
from kaggle_pipeline.checkpoints import save_hf
from kaggle_pipeline.checkpoints.adapter import save_adapter
from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
from kaggle_pipeline.data.records import read_tarr
from kaggle_pipeline.data.tasks import train_validation_split
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.evaluation import metrics
from kaggle_pipeline.evaluation.report import CONFUSION_PNG, LOSS_PNG, PER_TASK_PNG, REPORT_NAME
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import LoraConfig, init_lora
from kaggle_pipeline.run_config import PROJECT_DIR
from kaggle_pipeline.submission import read_sample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KOREAN = ["오늘 날씨가 정말 좋네요.", "저는 사과, 배, 포도를 좋아합니다.",
          "그가 말했다. \"곧 돌아올게.\""]


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def metric_in(report: Path, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \|$", report.read_text(), re.MULTILINE)
    assert match, f"no metric {name!r} in {report}"
    return match.group(1).strip()


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_rouge_of_identical_korean_texts_is_one():
    for unit in ("word", "char"):
        assert metrics.rouge(KOREAN, KOREAN, unit=unit) == {"rouge1": 1.0, "rouge2": 1.0,
                                                              "rougeL": 1.0}
    # Hangul is kept, not stripped: different Korean texts do not score 1.
    assert metrics.rouge(["오늘 날씨가 좋네요."], ["내일 비가 옵니다."])["rouge1"] == 0.0


def test_classification_report_with_the_task_reader(tmp_path, capsys):
    truth = [1, 0, 1, 1, 0, 0, 1, 0]
    guess = [1, 0, 0, 1, 0, 1, 1, 0]  # rows 3 and 6 wrong: accuracy 6/8
    comments = [f"리뷰 {i}" for i in range(8)]
    references = write_tsv(tmp_path / "valid.tsv", ["id", "comment", "label"],
                           [[i, comments[i], t] for i, t in enumerate(truth)])
    (tmp_path / "subs").mkdir()
    predictions = write_tsv(tmp_path / "subs" / "tarr.tsv", ["id", "comment", "label"],
                            [[i, comments[i], g] for i, g in enumerate(guess)])
    code = evaluate.main(["--predictions", str(predictions), "--references", str(references),
                          "--task", "tarr-sentiment"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "subs" / "tarr-report"  # beside the predictions
    report = out / REPORT_NAME
    assert f"report: {report}" in capsys.readouterr().out
    assert metric_in(report, "accuracy") == "0.7500"
    assert metric_in(report, "n") == "8"
    # Label order is the task's label map: 1 (긍정) then 0 (부정). Positive: 3 right, 1 missed;
    # negative: 3 right, 1 false positive.
    text = report.read_text()
    assert "| 긍정 | 3 | 1 |" in text and "| 부정 | 1 | 3 |" in text
    f1 = 2 * 3 / (2 * 3 + 1 + 1)
    assert metric_in(report, "macro_f1") == f"{f1:.4f}"
    assert metric_in(report, "f1[긍정]") == f"{f1:.4f}"
    assert is_png(out / CONFUSION_PNG) and is_png(out / PER_TASK_PNG)
    assert not (out / LOSS_PNG).exists()


def test_generation_report_of_identical_korean_is_perfect_and_adds_the_loss_curve(tmp_path):
    ids = ["a", "b", "c"]
    predictions = tmp_path / "pred.csv"
    pl.DataFrame({"id": ids, "ko": KOREAN}).write_csv(predictions)
    references = tmp_path / "ref.csv"
    pl.DataFrame({"id": ids[::-1], "ko": KOREAN[::-1]}).write_csv(references)  # any order
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    out = tmp_path / "report"
    assert evaluate.main(["--predictions", str(predictions), "--references", str(references),
                          "--run", str(run), "--out", str(out)]) == 0
    report = out / REPORT_NAME
    for name in ("rouge1", "rouge2", "rougeL", "rouge1_char", "rougeL_char"):
        assert metric_in(report, name) == "1.0000", name
    assert metric_in(report, "bleu") == "100.0000"
    assert metric_in(report, "chrf") == "100.0000"
    assert metric_in(report, "mismatch_rate") == "0.0000"
    assert "tok:char" in report.read_text()
    assert is_png(out / PER_TASK_PNG) and is_png(out / LOSS_PNG)
    assert not (out / CONFUSION_PNG).exists()
    assert "first 3.0000, last 0.6000" in report.read_text()


def test_generation_scores_count_wrong_language_outputs_as_zero(tmp_path):
    # A run's validation file holds its references; English answers to a Korean reference
    # mismatch, so half the outputs score 0.
    file = tmp_path / "validation_predictions.csv"
    pl.DataFrame({"id": ["1", "2"], "prediction": [KOREAN[0], "The weather is nice."],
                  "reference": [KOREAN[0], KOREAN[1]]}).write_csv(file)
    assert evaluate.main(["--predictions", str(file)]) == 0
    report = tmp_path / "validation_predictions-report" / REPORT_NAME
    assert metric_in(report, "mismatch_rate") == "0.5000"
    assert metric_in(report, "rouge1") == "0.5000"
    expected = metrics.generation_scores([KOREAN[0], "The weather is nice."], KOREAN[:2])
    assert metric_in(report, "chrf") == f"{expected['chrf']:.4f}"


@pytest.mark.parametrize(
    ("predicted", "message"),
    [
        ([["1", "1"]], r"pred.tsv: field 'id': 1 reference ids have no prediction: '2'"),
        ([["1", "1"], ["2", "0"], ["1", "0"]],
         r"pred.tsv: data rows 1 and 3, field 'id': duplicate id '1'"),
        ([["1", "1"], ["2", "0"], ["9", "0"]], r"pred.tsv: field 'id': 1 ids are not among"),
        ([["1", "1"], ["2", "7"]], r"predictions \['7'\] are not labels of the task"),
    ],
)
def test_errors_name_the_file_row_and_field(predicted, message, tmp_path, capsys):
    references = write_tsv(tmp_path / "ref.tsv", ["id", "comment", "label"],
                           [[1, "좋아요", 1], [2, "별로", 0]])
    predictions = write_tsv(tmp_path / "pred.tsv", ["id", "label"], predicted)
    code = evaluate.main(["--predictions", str(predictions), "--references", str(references),
                          "--task", "tarr-sentiment"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_config_evaluates_the_runs_validation_split(tmp_path, capsys):
    config = tiny_config("gemma3", vocab_size=262_144)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape)),
                          abstract_params(config))
    checkpoint = save_hf(params, config, tmp_path / "model", dtype=jnp.float32)
    Tokenizer.from_gguf(gemma3_270m_gguf()).save(checkpoint / "tokenizer.model")
    run = tmp_path / "runs" / "r"
    lora = LoraConfig(rank=4, alpha=8.0)
    save_adapter(init_lora(config, lora, jax.random.key(0)), lora, run / "adapter")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n"
                                       + json.dumps({"step": 2, "loss": 2.0}) + "\n")
    lines = (PROJECT_DIR / "data" / "tarr" / "train.tsv").read_text(encoding="utf-8")
    train_file = tmp_path / "train.tsv"
    train_file.write_text("".join(lines.splitlines(keepends=True)[:13]), encoding="utf-8")
    args = ["--config", str(_config(tmp_path, checkpoint, train_file)),
            "data.validation_fraction=0.25"]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    report = run / "evaluation" / REPORT_NAME
    written = read_sample(run / "validation_predictions.csv")
    # The split training drew: same file, seed, fraction and label strata.
    frame = read_tarr(train_file).frame
    _, valid = train_validation_split(frame, validation_fraction=0.25, seed=0,
                                      stratify_by="label")
    assert written["id"].to_list() == [str(i) for i in valid["id"].to_list()]
    assert written["reference"].to_list() == [str(v) for v in valid["label"].to_list()]
    assert set(written["prediction"].to_list()) <= {"0", "1"}
    accuracy = float(np.mean(written["prediction"].to_numpy() == written["reference"].to_numpy()))
    assert metric_in(report, "accuracy") == f"{accuracy:.4f}"
    assert metric_in(report, "n") == str(len(valid))
    assert "threshold" in report.read_text() and "auc" in report.read_text()
    assert all(is_png(run / "evaluation" / name) for name in (CONFUSION_PNG, PER_TASK_PNG,
                                                               LOSS_PNG))

    capsys.readouterr()
    assert evaluate.main(["--config", str(_config(tmp_path, checkpoint, train_file)),
                          "output.name=missing"]) == 2
    assert "no trained adapter" in capsys.readouterr().err


def _config(tmp_path: Path, checkpoint: Path, train_file: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"""
[model]
checkpoint = "{checkpoint}"
[data]
train = "{train_file}"
seq_len = 128
batch_size = 2
[lora]
rank = 4
alpha = 8.0
[output]
dir = "{tmp_path / 'runs'}"
name = "r"
""", encoding="utf-8")
    return path


def test_without_task_a_classification_file_is_scored_as_classification(tmp_path, capsys):
    # Two reviews, both labels once: not "repeated values", but whole-number labels.
    references = write_tsv(tmp_path / "ref.tsv", ["id", "comment", "label"],
                           [[1, "좋아요", 1], [2, "별로", 0]])
    predictions = write_tsv(tmp_path / "pred.tsv", ["id", "label"], [[1, 1], [2, 1]])
    assert evaluate.main(["--predictions", str(predictions), "--references",
                          str(references)]) == 0
    report = tmp_path / "pred-report" / REPORT_NAME
    assert report.read_text().startswith("# pred.tsv (classification, 2 examples)")
    assert metric_in(report, "accuracy") == "0.5000"
    # Short values that are neither repeated nor numbers: it refuses to guess.
    names = write_tsv(tmp_path / "names.tsv", ["id", "label"], [[1, "alpha"], [2, "beta"]])
    guesses = write_tsv(tmp_path / "guess.tsv", ["id", "label"], [[1, "alpha"], [2, "gamma"]])
    assert evaluate.main(["--predictions", str(guesses), "--references", str(names)]) == 2
    assert capsys.readouterr().err == (
        f"error: {guesses} and {names}: cannot tell whether ['alpha', 'beta', 'gamma'] are "
        "labels or texts; give --kind classification|generation or --task\n")
    assert evaluate.main(["--predictions", str(guesses), "--references", str(names),
                          "--kind", "classification"]) == 0


def test_a_file_without_the_label_column_or_with_the_wrong_separator(tmp_path, capsys):
    long_review = "정말 맛있어요 " * 150  # 1,800 characters: must not be printed
    test_file = write_tsv(tmp_path / "test.tsv", ["id", "comment"], [[1, long_review]])
    predictions = write_tsv(tmp_path / "pred.tsv", ["id", "label"], [[1, 1]])
    code = evaluate.main(["--predictions", str(predictions), "--references", str(test_file),
                          "--task", "tarr-sentiment"])
    assert code == 2
    assert capsys.readouterr().err == (f"error: {test_file}: missing column 'label'; the file "
                                       "has columns: 'id', 'comment'\n")
    # A CSV where a TSV is expected: one column whose name holds the commas.
    as_csv = tmp_path / "train.tsv"
    as_csv.write_text("id,comment,label\n1,좋아요,1\n", encoding="utf-8")
    assert evaluate.main(["--predictions", str(predictions), "--references", str(as_csv),
                          "--task", "tarr-sentiment"]) == 2
    assert capsys.readouterr().err == (
        f"error: {as_csv}: missing column 'id'; the file has columns: 'id,comment,label' (the "
        "header is one column holding commas: the file is comma-separated, read as tsv; set "
        'task.format = "csv" or save it as tsv)\n')
    comma_predictions = tmp_path / "pred2.tsv"
    comma_predictions.write_text("id,label\n1,1\n", encoding="utf-8")
    assert evaluate.main(["--predictions", str(comma_predictions), "--references",
                          str(as_csv)]) == 2
    assert capsys.readouterr().err == (
        f"error: {comma_predictions}: no column 'id'; the file has columns: 'id,label' (one "
        "column holding commas: the file is comma-separated; name it pred2.csv or save it with "
        "the separator its suffix says)\n")


def test_evaluate_with_nothing_evaluates_the_main_jobs_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kaggle_pipeline.run_setup.load_model", lambda *a, **k: pytest.fail(
        "the model was loaded before the run was checked"))
    assert evaluate.main([]) == 2
    assert capsys.readouterr().err == (
        "error: runs/tarr-sentiment/adapter: no trained adapter (lora_config.json missing); "
        "train first with `python -m kaggle_pipeline.train` and the same config, or point "
        "output.dir / output.name at the run\n")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--task", "tarr-sentiment"])
    assert stopped.value.code == 2
    assert "--task goes with --predictions" in capsys.readouterr().err


def test_the_decision_is_argmax_unless_the_task_asks_for_a_threshold():
    from kaggle_pipeline.evaluation import validation
    from kaggle_pipeline.predict import classification_line

    # margins score(1) - score(0): a cut at 1.5 separates the truth, argmax (cut 0) gets 2 wrong
    margins = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])
    truth = [0, 0, 0, 1, 1]
    scores = np.stack([margins, np.zeros(5)], axis=1)  # labels (1, 0)
    argmax = validation.calibrated_classification(scores, truth, [1, 0])
    assert argmax["decision"] == "argmax" and argmax["threshold"] == 0.0
    assert argmax["accuracy"] == argmax["raw_accuracy"] == 0.6
    assert argmax["calibrated_threshold"] == 1.5
    assert "accuracy 0.600 (argmax; a threshold fit on validation would score" in \
        classification_line(argmax)
    calibrated = validation.calibrated_classification(scores, truth, [1, 0],
                                                      decision="threshold")
    assert calibrated["threshold"] == calibrated["calibrated_threshold"] == 1.5
    assert calibrated["accuracy"] == 1.0 and calibrated["raw_accuracy"] == 0.6
    assert "accuracy 1.000 (threshold +1.500 fit on validation" in classification_line(calibrated)
    # more than two labels: always argmax
    three = validation.calibrated_classification(np.eye(3), [0, 1, 2], [0, 1, 2],
                                                 decision="threshold")
    assert three["decision"] == "argmax" and three["accuracy"] == 1.0
