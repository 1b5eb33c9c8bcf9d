"""`train.folds = k` on a tiny random Gemma 3 (the real vocabulary and tokenizer) and a slice of
the real tarr reviews: stratified folds, out-of-fold scores from models that never saw the row,
the fold-cross-fitted threshold, the ensemble or the refit predicting the test file, resumption,
and the predict command after a cross-validation."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import polars as pl
import pytest
from conftest import REPO

from kaggle_pipeline import predict, run_setup, train
from kaggle_pipeline.cross_validation import fold_runs, oof_summary
from kaggle_pipeline.data.tasks import build_examples, fold_assignment, get_task, load_records
from kaggle_pipeline.evaluation import validation
from kaggle_pipeline.inference.predictions import decide
from kaggle_pipeline.run_config import load_config
from kaggle_pipeline.submission import read_sample

LABELLED, TEST_ROWS, FOLDS = 30, 6, 3


def _head(source, out, rows):
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    return (root, _head(REPO / "data" / "tarr" / "train.tsv", root / "train.tsv", LABELLED),
            _head(REPO / "data" / "tarr" / "test.tsv", root / "test.tsv", TEST_ROWS))


def _args(files, name, *extra):
    root, train_file, test_file = files
    return ["model.checkpoint=", "model.preset=tiny-gemma3", "data.seq_len=128",
            "data.batch_size=2", "train.epochs=1", "optim.warmup_steps=1",
            f"train.folds={FOLDS}", f"data.train={train_file}", f"data.test={test_file}",
            f"output.dir={root / 'runs'}", f"output.name={name}",
            f"output.submissions={root / 'submissions' / name}", *extra]


def _submission(files, name):
    (path,) = (files[0] / "submissions" / name).iterdir()
    return path


@pytest.fixture(scope="module")
def ensemble(files, jax_compilation_cache):
    assert train.main(_args(files, "ensemble")) == 0
    return load_config(None, _args(files, "ensemble"))


# ----------------------------------------------------------------------------- folds


def test_folds_are_stratified_disjoint_and_fixed_by_the_seed():
    frame = pl.DataFrame({"label": [1] * 13 + [0] * 8, "id": list(range(21))})
    folds = fold_assignment(frame, folds=4, seed=3, stratify_by="label")
    assert fold_assignment(frame, folds=4, seed=3, stratify_by="label") == folds
    assert fold_assignment(frame, folds=4, seed=4, stratify_by="label") != folds
    sizes = [folds.count(i) for i in range(4)]
    assert sum(sizes) == 21 and max(sizes) - min(sizes) <= 1
    for i in range(4):  # 13 positives over 4 folds: 3 or 4 each; 8 negatives: 2 each
        labels = [label for label, f in zip(frame["label"], folds, strict=True) if f == i]
        assert labels.count(1) in (3, 4) and labels.count(0) == 2
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_assignment(frame, folds=1, seed=0)


def test_oof_accuracy_decides_each_fold_with_the_other_folds_threshold():
    # Fold 0's rows are separable at margin 0.5, fold 1's at 1.5: each fold decided with the
    # other's threshold gets one row wrong; the threshold fit on all rows is optimistic.
    margins = np.array([0.0, 1.0, 1.0, 2.0])
    truth = [0, 1, 0, 1]
    scores = np.stack([margins, np.zeros(4)], axis=1)  # labels (1, 0): score[0] - score[1]
    result = oof_summary(scores, truth, [0, 0, 1, 1], [1, 0], ["긍정", "부정"], "threshold")
    assert result["accuracy_per_fold"] == [0.5, 0.5]  # fold 0 cut at 1.5, fold 1 at 0.5
    assert result["accuracy"] == result["calibrated_accuracy"] == 0.5
    assert result["accuracy_fit_on_oof"] == 0.75
    assert result["raw_accuracy"] == 0.75  # argmax: margin > 0
    assert result["confusion"] == [[1, 1], [1, 1]]
    assert result["threshold"] == result["calibrated_threshold"] == 0.5
    # The default decision is argmax: its accuracy is the estimate, the threshold is 0, and
    # the calibrated decision's cross-fitted estimate is still reported.
    argmax = oof_summary(scores, truth, [0, 0, 1, 1], [1, 0], ["긍정", "부정"])
    assert argmax["decision"] == "argmax" and argmax["threshold"] == 0.0
    assert argmax["accuracy"] == argmax["raw_accuracy"] == 0.75
    assert argmax["accuracy_per_fold"] == [1.0, 0.5]  # margin 1.0 of a 0 is the one mistake
    assert argmax["calibrated_accuracy"] == 0.5 and argmax["calibrated_threshold"] == 0.5
    assert argmax["confusion"] == [[2, 0], [1, 1]]


# ----------------------------------------------------------------------------- runs


def test_every_row_is_scored_by_the_fold_model_that_never_saw_it(files, ensemble):
    cfg, run_dir = ensemble, ensemble.run_dir
    spec = run_setup.task_spec(cfg)
    frame = load_records(spec, files[1]).frame
    folds = fold_assignment(frame, folds=FOLDS, seed=0, stratify_by="label")
    ids = [str(i) for i in frame["id"].to_list()]
    oof = read_sample(run_dir / "oof_predictions.csv")
    assert oof["id"].to_list() == ids
    assert oof["fold"].to_list() == [str(f + 1) for f in folds]
    examples = build_examples(spec, frame)
    model, variables, tokenizer = run_setup.load_trained_adapters(cfg, fold_runs(cfg))
    for i, fold_variables in enumerate(variables):
        split = json.loads((run_dir / f"fold-{i + 1}" / "split.json").read_text())
        held_ids = [x for x, f in zip(ids, folds, strict=True) if f == i]
        assert split["held_out"] == held_ids
        assert sorted(split["train"] + split["held_out"], key=int) == ids  # disjoint, complete
        held = [e for e, f in zip(examples, folds, strict=True) if f == i]
        rescored = predict.classification_scores(model, fold_variables, tokenizer, spec, held,
                                                 cfg).scores
        rows = oof.filter(pl.col("fold") == str(i + 1))
        np.testing.assert_allclose(rescored[:, 0], rows["score[긍정]"].cast(float), rtol=1e-5)
        np.testing.assert_allclose(rescored[:, 1], rows["score[부정]"].cast(float), rtol=1e-5)


def test_the_test_set_gets_the_mean_of_the_fold_models_decided_by_argmax(files, ensemble):
    cfg, run_dir = ensemble, ensemble.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    result = summary["validation"]
    assert summary["validated_by"] == f"{FOLDS}-fold cross-validation (out-of-fold)"
    assert len(result["accuracy_per_fold"]) == FOLDS and result["n"] == LABELLED
    oof = read_sample(run_dir / "oof_predictions.csv")
    scores = np.stack([oof["score[긍정]"].cast(float), oof["score[부정]"].cast(float)], 1)
    truth = [int(t) for t in oof["reference"]]
    folds = [int(f) - 1 for f in oof["fold"]]
    # The scores round-trip exactly through the CSV: the summary is theirs, to the bit.
    assert result == json.loads(json.dumps(oof_summary(scores, truth, folds, [1, 0],
                                                       ["긍정", "부정"])))
    margins = scores[:, 0] - scores[:, 1]
    assert result["decision"] == "argmax" and result["threshold"] == 0.0
    assert result["calibrated_threshold"] == validation.best_threshold(
        margins, np.array([t == 1 for t in truth]))

    spec = run_setup.task_spec(cfg)
    test = build_examples(spec, load_records(spec, files[2], labelled=False).frame,
                          with_answers=False)
    model, variables, tokenizer = run_setup.load_trained_adapters(cfg, fold_runs(cfg))
    mean = np.mean([predict.classification_scores(model, v, tokenizer, spec, test, cfg).scores
                    for v in variables], axis=0)
    expected = decide(mean, [1, 0], result["threshold"])
    written = read_sample(_submission(files, "ensemble"))
    assert written["label"].to_list() == [str(label) for label in expected]


def test_predict_after_a_cross_validation_writes_the_same_submission(files, ensemble,
                                                                     tmp_path):
    cfg = dataclasses.replace(ensemble, output=dataclasses.replace(
        ensemble.output, submissions=str(tmp_path)))
    path = predict.predict(cfg)
    assert path.read_bytes() == _submission(files, "ensemble").read_bytes()


def test_an_interrupted_cross_validation_resumes_to_the_same_result(files, ensemble,
                                                                    monkeypatch):
    # Fold 2 of a fresh run dies mid-training; the rerun keeps fold 1 and finishes the rest.
    args = _args(files, "interrupted")
    loop = train.train_loop
    calls = []

    def dying(run):
        calls.append(run.cfg.output.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loop(run)

    monkeypatch.setattr(train, "train_loop", dying)
    assert train.main(args) == 130  # Ctrl-C
    monkeypatch.setattr(train, "train_loop", lambda run: calls.append(run.cfg.output.name)
                        or loop(run))
    assert train.main(args) == 0
    assert calls == ["fold-1", "fold-2", "fold-2", "fold-3"]
    root = files[0] / "runs"
    for name in ("oof_predictions.csv",):
        assert (root / "interrupted" / name).read_bytes() == (root / "ensemble" / name) \
            .read_bytes()
    assert _submission(files, "interrupted").read_bytes() == \
        _submission(files, "ensemble").read_bytes()


def test_refit_trains_on_every_labelled_row_and_predicts_with_the_oof_threshold(files,
                                                                               ensemble):
    args = _args(files, "refit", "train.refit=true", "task.decision=threshold")
    assert train.main(args) == 0
    run_dir = files[0] / "runs" / "refit"
    # The folds are the same as the ensemble's: the same out-of-fold scores.
    oof, ensemble_oof = (read_sample(d / "oof_predictions.csv").drop("prediction")
                         for d in (run_dir, ensemble.run_dir))
    assert oof.equals(ensemble_oof)
    summary = json.loads((run_dir / "summary.json").read_text())["validation"]
    assert summary["decision"] == "threshold"
    assert summary["threshold"] == summary["calibrated_threshold"] == json.loads(
        (ensemble.run_dir / "summary.json").read_text())["validation"]["calibrated_threshold"]
    refit = load_config(run_dir / "refit" / "config.toml")
    assert (run_dir / "refit" / "adapter").is_dir()
    cfg = load_config(None, args)
    spec = run_setup.task_spec(cfg)
    test = build_examples(spec, load_records(spec, files[2], labelled=False).frame,
                          with_answers=False)
    model, variables, tokenizer = run_setup.load_trained(refit)
    scores = predict.classification_scores(model, variables, tokenizer, spec, test, cfg).scores
    threshold = json.loads((run_dir / "summary.json").read_text())["validation"]["threshold"]
    written = read_sample(_submission(files, "refit"))
    assert written["label"].to_list() == [str(x) for x in decide(scores, [1, 0], threshold)]
    with open(run_dir / "refit" / "metrics.jsonl") as f:  # every row: more steps than a fold
        refit_steps = len(f.readlines())
    with open(run_dir / "fold-1" / "metrics.jsonl") as f:
        assert refit_steps > len(f.readlines())


def test_cross_validation_refuses_a_generation_task(files, capsys, tmp_path):
    data = tmp_path / "pairs.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["원문", "번역문"], ["안녕", "hello"], ["고양이", "cat"]])
    args = [*_args(files, "gen"), "data.task=aihub-parallel", f"data.train={data}",
            f"data.test={data}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "train.folds = 3: cross-validation needs a classification task" in err
    assert get_task("aihub-parallel").kind == "generation"
