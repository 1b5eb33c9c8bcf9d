"""`python -m kaggle_pipeline.predict [--config run.toml] [section.key=value ...]`

Loads the base model and what the run trained (`<output.dir>/<output.name>/adapter`, or
`model/` after full fine-tuning), predicts the task's test file and writes
`<output.submissions>/<output.name>-<timestamp>.<csv|tsv>` (recorded in the run's
summary.json). Training ends with the same steps (`evaluate_and_submit`): validation metrics,
then the test predictions, then the report.

Before any weight is read, the test file and the sample submission are read and checked, and
the run's identity (base checkpoint and training settings) is compared with the config's.

Classification scores every label's words (inference/label_scoring.py), so a prediction is always
a valid label, the one with the higher score; with task.decision = "threshold" a binary task
uses the threshold calibrated on validation (the run's summary.json; a run that stopped before
writing it has the threshold recomputed from the validation split, which the seed fixes).
Generation decodes in batches of similar length (inference/sampler.py) until <end_of_turn> or
<eos>, at most task.max_new_tokens tokens.

Input files: `data.train` / `data.test` name one file, except for Dolly, whose reader aligns two
(English, Korean): write them as "english.jsonl,korean.jsonl".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kaggle_pipeline import run_setup
from kaggle_pipeline.cli import log, run_command
from kaggle_pipeline.data.tasks import Example, TaskSpec
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.evaluation import validation
from kaggle_pipeline.files import read_json_object, write_text_atomically
from kaggle_pipeline.inference.label_scoring import LabelScores
from kaggle_pipeline.inference.predictions import Answers, classify, decide, generate
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.run_config import RunConfig, load_config
from kaggle_pipeline.submission import write_task_submission

SUMMARY_FILE = "summary.json"


def classification_scores(model: Transformer, variables: dict | list[dict],
                          tokenizer: Tokenizer, spec: TaskSpec, examples: Sequence[Example],
                          cfg: RunConfig) -> LabelScores:
    """Label scores ([n, num_labels], and how many prompts were cut) with the run's packing
    sizes, on the run's mesh; for a list of variables (the models of a cross-validation) the
    mean of their scores."""
    if isinstance(variables, list):
        each = [classification_scores(model, v, tokenizer, spec, examples, cfg)
                for v in variables]
        return LabelScores(np.mean([s.scores for s in each], axis=0), each[0].truncated)
    return classify(model, variables, tokenizer, spec, examples, seq_len=cfg.data.seq_len,
                    batch_size=cfg.data.batch_size * 2, max_prompt_len=cfg.data.max_prompt_len,
                    mesh=run_setup.build_mesh(cfg))


def _capped(examples: Sequence[Example], cfg: RunConfig, spec: TaskSpec) -> list[Example]:
    """The first task.validation_size examples (the split is already shuffled)."""
    limit = run_setup.validation_size(cfg, spec)
    chosen = list(examples)[:limit] if limit is not None else list(examples)
    if len(chosen) < len(examples):
        log(f"validating on the first {len(chosen)} of {len(examples)} validation examples "
            "(task.validation_size)")
    return chosen


def validate_classification(model: Transformer, variables: dict, tokenizer: Tokenizer,
                            spec: TaskSpec, examples: Sequence[Example],
                            cfg: RunConfig) -> tuple[dict, list]:
    """(metrics of the run's decision, argmax or the threshold calibrated on these examples,
    that decision per example)."""
    labels = list(spec.label_map)
    scores, truncated = classification_scores(model, variables, tokenizer, spec, examples, cfg)
    result = validation.calibrated_classification(scores, [e.label for e in examples], labels,
                                                  list(spec.label_map.values()),
                                                  run_setup.decision(cfg))
    result["truncated_prompts"] = truncated
    return validation.with_headline(result, spec.metric), decide(scores, labels,
                                                                 result["threshold"])


def generate_answers(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
                     examples: Sequence[Example], cfg: RunConfig,
                     known: dict[tuple, str] | None = None) -> Answers:
    """The answers to the examples' prompts (and how many prompts were cut), decoded as [task]
    says (run_setup.sampling_config), on the run's mesh. `known`: answers already decoded by
    this model, by prompt; only the other prompts are decoded, and their answers are added."""
    known = {} if known is None else known
    new = list({_key(e): e for e in examples if _key(e) not in known}.values())
    if len(new) < len(examples):
        log(f"{len(examples) - len(new)} of {len(examples)} prompts were answered already "
            "(validation): their answers are reused")
    answers = generate(model, variables, tokenizer, spec, new,
                       sampling=run_setup.sampling_config(cfg),
                       max_prompt_len=cfg.data.max_prompt_len, mesh=run_setup.build_mesh(cfg),
                       seed=cfg.train.seed)
    known.update(zip(map(_key, new), answers.texts, strict=True))
    return Answers([known[_key(e)] for e in examples], answers.truncated)


def _key(example: Example) -> tuple:
    """The turns an example's answer is generated from, as a dict key."""
    return tuple((turn.role, turn.text) for turn in example.prompt)


def validate_generation(model: Transformer, variables: dict, tokenizer: Tokenizer,
                        spec: TaskSpec, examples: Sequence[Example], cfg: RunConfig,
                        known: dict[tuple, str] | None = None) -> dict:
    """Generate the validation answers, score them against the references and write them with
    the references to `<run dir>/validation_predictions.csv`. Returns the metrics and that
    file's path. `known`: as for generate_answers."""
    chosen = [e for e in examples if e.answer is not None]
    if not chosen:
        raise ValueError(f"task {spec.name!r}: no validation example has a reference answer")
    log(f"generating {len(chosen)} validation answers")
    predictions, truncated = generate_answers(model, variables, tokenizer, spec, chosen, cfg,
                                              known)
    references = [e.answer for e in chosen]
    result = validation.generation_metrics(predictions, references, spec.target_lang)
    result = validation.with_headline(result, spec.metric)
    result["truncated_prompts"] = truncated
    path = validation.write_table(cfg.run_dir / validation.VALIDATION_FILE, {
        "id": [e.id for e in chosen], "prediction": predictions, "reference": references})
    result["predictions_file"] = str(path)
    log(f"validation BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f} "
        f"ROUGE-L {result['rougeL']:.3f} language mismatch {result['mismatch_rate']:.1%}")
    for e, prediction in list(zip(chosen, predictions, strict=True))[:3]:
        log(f"  {e.id}: {prediction[:80]!r} (reference {e.answer[:80]!r})")
    return result


def predict_test(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
                 cfg: RunConfig, threshold: float = 0.0, *,
                 examples: Sequence[Example] | None = None,
                 known: dict[tuple, str] | None = None) -> Path:
    """The test file's predictions, written as the submission; returns its path. `examples`:
    the test file already read (run_setup.read_test), else it is read here. `known`: answers
    this model already generated, by prompt (generate_answers)."""
    if examples is None:
        examples = run_setup.read_test(cfg, spec)
    test_paths = run_setup.input_paths(spec, cfg.data.test, "data.test")
    log(f"predicting {len(examples)} test rows of {cfg.data.test}")
    if spec.kind == "classification":
        predictions = decide(classification_scores(model, variables, tokenizer, spec, examples,
                                                   cfg).scores, list(spec.label_map), threshold)
    else:
        predictions = generate_answers(model, variables, tokenizer, spec, examples, cfg,
                                       known).texts
    first = test_paths[0] if isinstance(test_paths, tuple) else test_paths
    return write_task_submission(spec, first, cfg.output.submissions,
                                 [e.id for e in examples], predictions,
                                 run_name=cfg.output.name)


def report_title(cfg: RunConfig, spec: TaskSpec, what: str = "") -> str:
    """`<run name> (<task>)`, the task left out when the run is named after it."""
    title = cfg.output.name if spec.name == cfg.output.name else \
        f"{cfg.output.name} ({spec.name})"
    return f"{title}: {what}" if what else title


def classification_line(result: dict) -> str:
    """The log line of a classification validation: the competition's metric first."""
    head = f"validation {result['metric']} {result['score']:.3f}, " if "metric" in result \
        else "validation "
    if "auc" not in result:  # more than two labels: argmax, nothing calibrated
        return (f"{head}accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
                f"({result['n']} examples)")
    if result.get("decision") == "threshold":
        return (f"{head}accuracy {result['accuracy']:.3f} (threshold {result['threshold']:+.3f} "
                f"fit on validation; cross-fitted {result['accuracy_cross_fitted']:.3f}, "
                f"argmax {result['raw_accuracy']:.3f}, AUC {result['auc']:.3f})")
    return (f"{head}accuracy {result['accuracy']:.3f} (argmax; a threshold fit on validation "
            f"would score {result['accuracy_cross_fitted']:.3f} cross-fitted, "
            f"AUC {result['auc']:.3f})")


def evaluate_and_submit(cfg: RunConfig, spec: TaskSpec, model: Transformer, variables: dict,
                        tokenizer: Tokenizer, valid_examples: Sequence[Example], *,
                        test_examples: Sequence[Example] | None = None) -> dict:
    """After training: validation metrics (and the calibrated threshold), the test predictions
    as a submission, and the run's report. Returns what goes into summary.json."""
    from kaggle_pipeline.evaluation.report import write_report

    out: dict = {}
    threshold = 0.0
    known: dict[tuple, str] = {}  # generation: a validated test prompt is not decoded again
    valid_examples = _capped(valid_examples, cfg, spec)
    if spec.kind == "classification" and valid_examples:
        log(f"scoring {len(valid_examples)} validation examples")
        result, _ = validate_classification(model, variables, tokenizer, spec, valid_examples,
                                            cfg)
        threshold = result["threshold"]
        out["validation"] = result
        log(classification_line(result))
    elif spec.kind == "generation" and valid_examples:
        out["validation"] = validate_generation(model, variables, tokenizer, spec,
                                                valid_examples, cfg, known)
    if cfg.data.test:
        path = predict_test(model, variables, tokenizer, spec, cfg, threshold,
                            examples=test_examples, known=known)
        out["submission"] = str(path)
        log(f"submission written: {path}")
    report = write_report(
        cfg.run_dir / "report", metrics=validation.report_table(out.get("validation", {})),
        confusion=out.get("validation", {}).get("confusion"),
        labels=list(spec.label_map.values()) if spec.label_map else None,
        label_values=list(spec.label_map) if spec.label_map else None,
        loss_curve_jsonl=cfg.run_dir / "metrics.jsonl", title=report_title(cfg, spec))
    out["report"] = str(report)
    log(f"report: {report}")
    return out


def recomputed_threshold(cfg: RunConfig, spec: TaskSpec, model: Transformer, variables: dict,
                         tokenizer: Tokenizer) -> float:
    """The threshold the run would have calibrated: the same validation split (the seed fixes
    it), scored by the trained model."""
    _, valid = run_setup.read_examples(cfg, spec)
    valid = _capped(valid, cfg, spec)
    if not valid:
        log("no validation split (data.validation_fraction = 0): threshold 0")
        return 0.0
    result, _ = validate_classification(model, variables, tokenizer, spec, valid, cfg)
    log(f"recomputed the threshold from {len(valid)} validation examples: "
        f"{result['threshold']:+.3f}")
    return result["threshold"]


def record_submission(cfg: RunConfig, path: Path) -> None:
    """Add the submission to the run's summary.json (`submissions`, newest last)."""
    summary_path = cfg.run_dir / SUMMARY_FILE
    summary = read_json_object(summary_path) or {}
    summary["submission"] = str(path)
    summary.setdefault("submissions", []).append(str(path))
    write_text_atomically(summary_path, json.dumps(summary, indent=2, ensure_ascii=False))


def predict_cross_validated(cfg: RunConfig, spec: TaskSpec) -> Path:
    """After `train.folds = k`: the refit model, or the mean label scores of the fold models,
    with the threshold fit on the out-of-fold scores."""
    from kaggle_pipeline.cross_validation import fold_runs

    runs = fold_runs(cfg)
    for run in runs:  # every model is there and was trained from these inputs
        run_setup.trained_path(run)
        run_setup.check_trained_from(run, spec)
    threshold = run_setup.saved_threshold(cfg)
    if threshold is None:
        raise run_setup.TrainedModelMissing(
            f"{cfg.run_dir / SUMMARY_FILE}: the cross-validation did not finish; run "
            "`python -m kaggle_pipeline.train` with the same config to finish it (the finished "
            "folds are kept)")
    test_examples = run_setup.read_test(cfg, spec)
    if cfg.lora.enabled:
        model, variables, tokenizer = run_setup.load_trained_adapters(cfg, runs, spec.style)
    else:
        loaded = [run_setup.load_trained(run, spec.style) for run in runs]
        model, tokenizer, variables = loaded[0][0], loaded[0][2], [v for _, v, _ in loaded]
    run_setup.check_tokenizer(tokenizer, model.config, spec.style)
    path = predict_test(model, variables, tokenizer, spec, cfg, threshold,
                        examples=test_examples)
    record_submission(cfg, path)
    log(f"wrote {path}")
    return path


def predict(cfg: RunConfig) -> Path:
    spec = run_setup.task_spec(cfg)
    if cfg.train.folds > 1:
        return predict_cross_validated(cfg, spec)
    run_setup.trained_path(cfg)  # a run that saved nothing fails before anything is read
    run_setup.check_trained_from(cfg, spec)
    test_examples = run_setup.read_test(cfg, spec)
    threshold = run_setup.saved_threshold(cfg) if spec.kind == "classification" else 0.0
    if threshold is None and len(spec.label_map) == 2:
        log(f"{cfg.run_dir / SUMMARY_FILE} has no calibrated threshold (the run stopped "
            "before validating): recomputing it from the validation split")
    model, variables, tokenizer = run_setup.load_trained(cfg, spec.style)
    run_setup.check_tokenizer(tokenizer, model.config, spec.style)
    if threshold is None:
        threshold = recomputed_threshold(cfg, spec, model, variables, tokenizer) \
            if len(spec.label_map) == 2 else 0.0
    path = predict_test(model, variables, tokenizer, spec, cfg, threshold,
                        examples=test_examples)
    record_submission(cfg, path)
    log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return run_command(lambda: predict(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    raise SystemExit(main())
