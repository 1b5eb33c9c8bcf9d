"""`python -m kaggle_pipeline.predict [--config run.toml] [section.key=value ...]`

Loads the base model and what the run trained (`<output.dir>/<output.name>/adapter`, or
`model/` after full fine-tuning), predicts the task's test file and writes
`<output.submissions>/<task>-<timestamp>.<csv|tsv>`. Training ends with the same steps
(`evaluate_and_submit`): validation metrics, then the test predictions, then the report.

Classification scores every label's words (inference/label_scoring.py), so a prediction is always
a valid label; a binary task uses the threshold calibrated on validation (the run's
summary.json). Generation decodes greedily in batches of similar length (inference/sampler.py)
until <end_of_turn> or <eos>.

Input files: `data.train` / `data.test` name one file, except for Dolly, whose reader aligns two
(English, Korean): write them as "english.jsonl,korean.jsonl".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kaggle_pipeline import run_setup
from kaggle_pipeline.cli import log, run_command
from kaggle_pipeline.data.tasks import Example, TaskSpec, build_examples, load_records
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.evaluation import validation
from kaggle_pipeline.inference.predictions import MAX_NEW_TOKENS, classify, decide, generate
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.run_config import RunConfig, load_config
from kaggle_pipeline.submission import write_task_submission

# Validation of a generation task decodes at most this many examples (decoding is the slow part).
VALIDATION_LIMIT = 256


def classification_scores(model: Transformer, variables: dict, tokenizer: Tokenizer,
                          spec: TaskSpec, examples: Sequence[Example], cfg: RunConfig):
    """Label scores ([n, num_labels], and how many prompts were cut) with the run's packing
    sizes, on the run's mesh."""
    return classify(model, variables, tokenizer, spec, examples, seq_len=cfg.data.seq_len,
                    batch_size=cfg.data.batch_size * 2, max_prompt_len=cfg.data.max_prompt_len,
                    mesh=run_setup.build_mesh(cfg))


def validate_classification(model: Transformer, variables: dict, tokenizer: Tokenizer,
                            spec: TaskSpec, examples: Sequence[Example],
                            cfg: RunConfig) -> tuple[dict, list]:
    """(metrics of the decision calibrated on these examples, that decision per example)."""
    labels = list(spec.label_map)
    scores, truncated = classification_scores(model, variables, tokenizer, spec, examples, cfg)
    result = validation.calibrated_classification(scores, [e.label for e in examples], labels,
                                                  list(spec.label_map.values()))
    result["truncated_prompts"] = truncated
    return result, decide(scores, labels, result["threshold"])


def validate_generation(model: Transformer, variables: dict, tokenizer: Tokenizer,
                        spec: TaskSpec, examples: Sequence[Example], cfg: RunConfig, *,
                        limit: int = VALIDATION_LIMIT, max_new_tokens: int = MAX_NEW_TOKENS,
                        ) -> dict:
    """Generate the validation answers (the first `limit` examples; the split is already
    shuffled), score them against the references and write them with the references to
    `<run dir>/validation_predictions.csv`. Returns the metrics and that file's path."""
    chosen = [e for e in examples if e.answer is not None][:limit]
    if not chosen:
        raise ValueError(f"task {spec.name!r}: no validation example has a reference answer")
    log(f"generating {len(chosen)} validation answers"
        + (f" (the first {limit} of {len(examples)})" if len(examples) > limit else ""))
    predictions, truncated = generate(model, variables, tokenizer, spec, chosen,
                                      max_new_tokens=max_new_tokens,
                                      max_prompt_len=cfg.data.max_prompt_len,
                                      mesh=run_setup.build_mesh(cfg))
    references = [e.answer for e in chosen]
    result = validation.generation_metrics(predictions, references, spec.target_lang)
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
                 max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """The test file's predictions, written as the submission; returns its path."""
    test_paths = run_setup.input_paths(spec, cfg.data.test, "data.test")
    test = load_records(spec, test_paths, labelled=False, on_bad_row=cfg.data.on_bad_row)
    examples = build_examples(spec, test.frame, with_answers=False)
    log(f"predicting {len(examples)} test rows of {cfg.data.test}")
    if spec.kind == "classification":
        predictions = decide(classification_scores(model, variables, tokenizer, spec, examples,
                                                   cfg).scores, list(spec.label_map), threshold)
    else:
        predictions = generate(model, variables, tokenizer, spec, examples,
                               max_new_tokens=max_new_tokens,
                               max_prompt_len=cfg.data.max_prompt_len,
                               mesh=run_setup.build_mesh(cfg)).texts
    first = test_paths[0] if isinstance(test_paths, tuple) else test_paths
    return write_task_submission(spec, first, cfg.output.submissions,
                                 [e.id for e in examples], predictions)


def evaluate_and_submit(cfg: RunConfig, spec: TaskSpec, model: Transformer, variables: dict,
                        tokenizer: Tokenizer, valid_examples: Sequence[Example]) -> dict:
    """After training: validation metrics (and the calibrated threshold), the test predictions
    as a submission, and the run's report. Returns what goes into summary.json."""
    from kaggle_pipeline.evaluation.report import write_report

    out: dict = {}
    threshold = 0.0
    if spec.kind == "classification" and valid_examples:
        log(f"scoring {len(valid_examples)} validation reviews")
        result, _ = validate_classification(model, variables, tokenizer, spec, valid_examples,
                                            cfg)
        threshold = result["threshold"]
        out["validation"] = result
        log(f"validation accuracy {result['accuracy']:.3f} (threshold {threshold:+.3f} fit "
            f"on validation; cross-fitted {result.get('accuracy_cross_fitted', 0):.3f}, "
            f"uncalibrated {result['raw_accuracy']:.3f}, AUC {result.get('auc', 0):.3f})")
    elif spec.kind == "generation" and valid_examples:
        out["validation"] = validate_generation(model, variables, tokenizer, spec,
                                                valid_examples, cfg)
    if cfg.data.test:
        path = predict_test(model, variables, tokenizer, spec, cfg, threshold)
        out["submission"] = str(path)
        log(f"submission written: {path}")
    report = write_report(
        cfg.run_dir / "report", metrics={k: v for k, v in out.get("validation", {}).items()
                                         if isinstance(v, (int, float))},
        confusion=out.get("validation", {}).get("confusion"),
        labels=list(spec.label_map.values()) if spec.label_map else None,
        loss_curve_jsonl=cfg.run_dir / "metrics.jsonl",
        title=f"{spec.name}: {cfg.output.name}")
    out["report"] = str(report)
    log(f"report: {report}")
    return out


def predict(cfg: RunConfig) -> Path:
    spec = run_setup.task_spec(cfg)
    model, variables, tokenizer = run_setup.load_trained(cfg)
    threshold = run_setup.saved_threshold(cfg) if spec.kind == "classification" else 0.0
    path = predict_test(model, variables, tokenizer, spec, cfg, threshold)
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
