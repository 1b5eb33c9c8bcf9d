"""The train command's cross-validation mode (`train.folds = k`, classification tasks).

The labelled rows are dealt into k stratified folds. Fold i's adapter trains on the other k-1
folds (a run of its own under `<run dir>/fold-<i>`, resumable like any run) and then scores its
held-out fold and the test file. The held-out scores of all folds are out-of-fold (OOF) scores:
every labelled row scored by a model that never saw it. From them:

- the honest estimates: OOF accuracy of the plain argmax decision, of the calibrated decision
  with each fold's threshold fit on the other folds' OOF margins (cross-fitted), AUC, and the
  spread of the per-fold accuracies;
- the decision for the test set (`task.decision`): argmax (the default), or the threshold fit
  on all OOF margins.

The test set is predicted with the mean of the k fold models' label scores (an ensemble), or
with one model refit on every labelled row (`train.refit = true`), whichever the config asks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from kaggle_pipeline import run_setup
from kaggle_pipeline.cli import log
from kaggle_pipeline.data.tasks import Example, build_examples, fold_assignment
from kaggle_pipeline.evaluation import metrics, validation
from kaggle_pipeline.files import write_atomically, write_text_atomically
from kaggle_pipeline.inference.predictions import decide
from kaggle_pipeline.run_config import ConfigError, RunConfig, to_toml

SCORES_FILE = "scores.npz"  # a finished fold's held-out and test label scores (no pickle)
SPLIT_FILE = "split.json"  # the ids a fold trained on and held out


@dataclasses.dataclass(frozen=True)
class FoldScores:
    held_out: np.ndarray  # [rows of the fold, labels]
    test: np.ndarray | None  # [test rows, labels]


def fold_config(cfg: RunConfig, name: str) -> RunConfig:
    """A fold's (or the refit's) own run: under the parent's run dir, no prediction of its own."""
    return dataclasses.replace(
        cfg, output=dataclasses.replace(cfg.output, dir=str(cfg.run_dir), name=name),
        train=dataclasses.replace(cfg.train, folds=0, refit=False, predict=False))


def _save_scores(path: Path, scores: FoldScores) -> None:
    arrays = {"held_out": scores.held_out}
    if scores.test is not None:
        arrays["test"] = scores.test
    write_atomically(path, lambda tmp: np.savez(tmp.open("wb"), **arrays))


def _load_scores(path: Path, rows: int, test_rows: int | None) -> FoldScores | None:
    """The scores a finished fold saved, or None if there are none that fit these rows."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        held_out = saved["held_out"]
        test = saved["test"] if "test" in saved.files else None
    if len(held_out) != rows or (test_rows is not None and (test is None or
                                                            len(test) != test_rows)):
        return None
    return FoldScores(held_out, test)


def _train_and_score(cfg: RunConfig, train_examples: list[Example],
                     held_out: list[Example], test: list[Example] | None, base) -> FoldScores:
    """Trains (or resumes) one fold's run, then scores its held-out rows and the test rows."""
    from kaggle_pipeline import predict, train

    run = train.prepare(cfg, (train_examples, held_out), base)
    state = train.train_loop(run)
    model, variables = train.save_trained(run, state)
    spec, tokenizer = run.spec, run.tokenizer
    scored = predict.classification_scores(model, variables, tokenizer, spec, held_out,
                                           cfg).scores \
        if held_out else np.zeros((0, len(spec.label_map)))
    test_scores = None if test is None else predict.classification_scores(
        model, variables, tokenizer, spec, test, cfg).scores
    return FoldScores(scored, test_scores)


def oof_summary(scores: np.ndarray, truth: list, folds: list[int], labels: list,
                names: list[str], decision: str = "argmax") -> dict:
    """The out-of-fold estimates (see the module's doc) and the threshold for the test set.

    `accuracy`, `macro_f1`, the per-class F1 and the confusion matrix are those of `decision`:
    "argmax", or "threshold", the calibrated decision (binary; otherwise argmax) with each
    fold's rows decided by the threshold fit on the other folds, what calibration is worth on
    rows nobody tuned on. Both are always reported: `raw_*` is argmax, `calibrated_*` the
    cross-fitted calibrated decision. `threshold` is the test set's: 0 for argmax, else fit on
    all OOF rows (`accuracy_fit_on_oof` is its accuracy on those same rows, optimistic)."""
    k = max(folds) + 1
    fold_of = np.asarray(folds)
    calibrated: list = [None] * len(truth)
    per_fold, per_fold_raw = [], []
    for i in range(k):
        rows = np.flatnonzero(fold_of == i)
        others = np.flatnonzero(fold_of != i)
        threshold = 0.0
        if len(labels) == 2:
            margins = scores[others, 0] - scores[others, 1]
            positive = np.array([truth[r] == labels[0] for r in others])
            threshold = validation.best_threshold(margins, positive)
        truth_i = [truth[r] for r in rows]
        for r, d in zip(rows, decide(scores[rows], labels, threshold), strict=True):
            calibrated[r] = d
        per_fold.append(metrics.accuracy(truth_i, [calibrated[r] for r in rows]))
        per_fold_raw.append(metrics.accuracy(truth_i, decide(scores[rows], labels)))
    calibrated_metrics = validation.classification_metrics(truth, calibrated, labels, names)
    fit_on_oof = validation.calibrated_classification(scores, truth, labels, names,
                                                      decision="threshold")
    if decision == "threshold":
        result = calibrated_metrics
    else:
        result = validation.classification_metrics(truth, decide(scores, labels), labels, names)
        per_fold = per_fold_raw
    result.update({
        "decision": decision,
        "raw_accuracy": fit_on_oof["raw_accuracy"], "raw_macro_f1": fit_on_oof["raw_macro_f1"],
        "calibrated_accuracy": calibrated_metrics["accuracy"],
        "threshold": fit_on_oof["threshold"] if decision == "threshold" else 0.0,
        "accuracy_fit_on_oof": fit_on_oof["accuracy"],
        "folds": k, "accuracy_per_fold": per_fold,
        "accuracy_fold_std": float(np.std(per_fold)), "raw_accuracy_per_fold": per_fold_raw})
    for key in ("auc", "calibrated_threshold"):  # binary tasks
        if key in fit_on_oof:
            result[key] = fit_on_oof[key]
    return result


def fold_runs(cfg: RunConfig) -> list[RunConfig]:
    """The runs whose models predict the test set: the refit, or every fold."""
    if cfg.train.refit:
        return [fold_config(cfg, "refit")]
    return [fold_config(cfg, f"fold-{i + 1}") for i in range(cfg.train.folds)]


def cross_validate(cfg: RunConfig) -> dict:
    from kaggle_pipeline import train
    from kaggle_pipeline.evaluation.report import write_report
    from kaggle_pipeline.submission import write_task_submission

    started = time.time()
    spec = run_setup.task_spec(cfg)
    if spec.kind != "classification":
        raise ConfigError(f"train.folds = {cfg.train.folds}: cross-validation needs a "
                          f"classification task; {spec.name!r} is {spec.kind} (validate it on "
                          "data.validation or a split instead)")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "config.toml", to_toml(cfg))

    frame = run_setup.read_labelled(cfg, spec)
    examples = build_examples(spec, frame)
    folds = fold_assignment(frame, folds=cfg.train.folds, seed=cfg.train.seed,
                            stratify_by=spec.stratify_column)
    # The test file (and the sample) checked before any training, like a single run does.
    test_examples = run_setup.read_test(cfg, spec) if cfg.train.predict and cfg.data.test \
        else None
    labels, names = list(spec.label_map), list(spec.label_map.values())
    k = cfg.train.folds
    log(f"{k}-fold cross-validation of {len(examples)} labelled rows "
        f"({', '.join(str(folds.count(i)) for i in range(k))} per fold)")

    base = None
    oof = np.zeros((len(examples), len(labels)))
    fold_test_scores = []
    for i in range(k):
        fold_cfg = fold_config(cfg, f"fold-{i + 1}")
        held = [e for e, f in zip(examples, folds, strict=True) if f == i]
        rest = [e for e, f in zip(examples, folds, strict=True) if f != i]
        scores_path = fold_cfg.run_dir / SCORES_FILE
        need_test = None if cfg.train.refit else test_examples
        saved = _load_scores(scores_path, len(held),
                             None if need_test is None else len(need_test))
        if saved is not None:  # trained from these inputs? (the identity check refuses if not)
            run_setup.check_run_identity(fold_cfg, spec, has_checkpoint=True)
            log(f"fold {i + 1}/{k}: finished earlier, scores read from {scores_path}")
        else:
            log(f"fold {i + 1}/{k}: training on {len(rest)} rows, holding out {len(held)}")
            fold_cfg.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(fold_cfg.run_dir / SPLIT_FILE, json.dumps(
                {"train": [str(e.id) for e in rest], "held_out": [str(e.id) for e in held]},
                ensure_ascii=False) + "\n")
            base = base or train.load_base(cfg)
            saved = _train_and_score(fold_cfg, rest, held, need_test, base)
            _save_scores(scores_path, saved)
        oof[[r for r, f in enumerate(folds) if f == i]] = saved.held_out
        if saved.test is not None:
            fold_test_scores.append(saved.test)

    truth = [e.label for e in examples]
    result = oof_summary(oof, truth, folds, labels, names, run_setup.decision(cfg))
    log(f"out-of-fold accuracy {result['accuracy']:.3f} ({result['decision']}; per fold "
        f"{', '.join(f'{a:.2f}' for a in result['accuracy_per_fold'])}); argmax "
        f"{result['raw_accuracy']:.3f}, threshold cross-fitted by fold "
        f"{result['calibrated_accuracy']:.3f}, AUC {result.get('auc', 0):.3f}")
    ids = [e.id for e in examples]
    validation.write_table(run_dir / "oof_predictions.csv", {
        "id": ids, "fold": [f + 1 for f in folds], "reference": truth,
        **{f"score[{n}]": oof[:, j] for j, n in enumerate(names)},
        "prediction": decide(oof, labels, result["threshold"])})
    summary = {"validation": result, "validated_by": f"{k}-fold cross-validation (out-of-fold)"}

    if test_examples is not None:
        if cfg.train.refit:
            refit_cfg = fold_config(cfg, "refit")
            log(f"refit on all {len(examples)} labelled rows")
            base = base or train.load_base(cfg)
            test_scores = _train_and_score(refit_cfg, examples, [], test_examples, base).test
            how = "one model refit on every labelled row"
        else:
            test_scores = np.mean(fold_test_scores, axis=0)
            how = f"the mean label scores of the {k} fold models"
        log(f"predicting {len(test_examples)} test rows with {how}")
        predictions = decide(test_scores, labels, result["threshold"])
        test_paths = run_setup.input_paths(spec, cfg.data.test, "data.test")
        first = test_paths[0] if isinstance(test_paths, tuple) else test_paths
        path = write_task_submission(spec, first, cfg.output.submissions,
                                     [e.id for e in test_examples], predictions,
                                     run_name=cfg.output.name)
        summary["submission"] = str(path)
        summary["submissions"] = [str(path)]
        summary["test_predicted_by"] = how
        log(f"submission written: {path}")
    report = write_report(
        run_dir / "report", metrics={key: v for key, v in result.items()
                                     if isinstance(v, (int, float))},
        confusion=result.get("confusion"), labels=names,
        title=f"{spec.name}: {cfg.output.name} ({k}-fold cross-validation)")
    summary["report"] = str(report)
    summary["total_seconds"] = round(time.time() - started, 1)
    write_text_atomically(run_dir / "summary.json",
                          json.dumps(summary, indent=2, ensure_ascii=False))
    log(f"report: {report}")
    return summary
