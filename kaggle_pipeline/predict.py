"""Trained model -> predictions -> a submission file (and validation metrics).

`python -m kaggle_pipeline.predict --config <file> [section.key=value ...]` loads the base model
and what the run trained (`<output.dir>/<output.name>/adapter`, or `model/` after full
fine-tuning), predicts the task's test file and writes
`<output.submissions>/<task>-<timestamp>.<csv|tsv>`.

Classification scores every label's words (scoring.py), so a prediction is always a valid label;
a binary task uses the threshold calibrated on validation (the run's summary.json). Generation
decodes greedily in batches of similar length (sampler.py) until <end_of_turn> or <eos>.

Submission format. Classification: the test file is the competition's sample (AIFactory's
test.tsv `id, comment` becomes `id, comment, label`). Generation: the task's output columns
(`id` and the answer column, e.g. `ko` for dolly-en-ko), in test-file order, tab-separated when
the test file is a .tsv, else comma-separated.

Input files: `data.train` / `data.test` name one file, except for Dolly, whose reader aligns two
(English, Korean): write them as "english.jsonl,korean.jsonl".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_pipeline import metrics
from kaggle_pipeline.chat_template import encode_prompt
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.packing import bucket_by_length
from kaggle_pipeline.run_config import RunConfig, load_config, resolve_input
from kaggle_pipeline.sampler import Sampler, SamplingConfig
from kaggle_pipeline.scoring import best_threshold, cross_fitted_accuracy, score_labels
from kaggle_pipeline.submission import (
    separator_for,
    submission_path,
    write_atomically,
    write_submission,
)
from kaggle_pipeline.tasks import Example, TaskSpec, build_examples, get_task, load_records
from kaggle_pipeline.tokenizer import Tokenizer

# Generation budget: long enough for a Dolly answer or a summary, short enough that a model which
# never closes its turn cannot stall a run.
MAX_NEW_TOKENS = 256
# Validation of a generation task decodes at most this many examples (decoding is the slow part).
VALIDATION_LIMIT = 256
VALIDATION_FILE = "validation_predictions.csv"
# A submission cell may not be empty; an answer that decodes to nothing is written as this.
EMPTY_ANSWER = "-"
# The script a translation's output should be in (metrics.is_script_mismatch); Japanese mixes
# Kana and Han, so it is left to the reference's dominant script.
TARGET_SCRIPTS = {"ko": "hangul", "en": "latin", "zh": "han"}


class TrainedModelMissing(FileNotFoundError):
    """The run directory holds no adapter (or full model) to predict with."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def task_spec(cfg: RunConfig) -> TaskSpec:
    options = {"prompt": cfg.data.prompt} if cfg.data.prompt else {}
    return get_task(cfg.data.task, **options)


def input_paths(spec: TaskSpec, value: str | Sequence[str], field: str = "data.train"
                ) -> Path | tuple[Path, Path]:
    """A data.train / data.test value as the task's reader takes it: one path, or for Dolly the
    (English, Korean) pair, written "english.jsonl,korean.jsonl" or as a TOML list."""
    parts = [value] if isinstance(value, str) else [str(v) for v in value]
    if spec.reader == "dolly":
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{field}: task {spec.name!r} reads two files, English and Korean "
                             f"JSON lines, written 'english.jsonl,korean.jsonl'; got {value!r}")
        return resolve_input(parts[0]), resolve_input(parts[1])
    if len(parts) != 1 or not parts[0]:
        raise ValueError(f"{field}: task {spec.name!r} reads one file, got {value!r}")
    return resolve_input(parts[0])


def answer_column(spec: TaskSpec) -> str:
    """The submission column the predictions go to."""
    if spec.kind == "classification":
        return spec.label_column
    return spec.output_columns[-1] if spec.output_columns else "prediction"


# ----------------------------------------------------------------------------- classification


def classify(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: list[Example], cfg: RunConfig) -> np.ndarray:
    """[n, num_labels] label scores (log-probabilities of each label's words)."""
    words = list(spec.label_map.values())
    return score_labels(model, variables, tokenizer, [e.prompt for e in examples], words,
                        style=spec.style, seq_len=cfg.data.seq_len,
                        batch_size=cfg.data.batch_size * 2)


def decide(scores: np.ndarray, labels: list, threshold: float = 0.0) -> list:
    """Binary: positive when margin = score[0] - score[1] exceeds the calibrated threshold
    (label order is the label map's); otherwise the best-scoring label."""
    if len(labels) == 2:
        return [labels[0] if m > threshold else labels[1] for m in scores[:, 0] - scores[:, 1]]
    return [labels[i] for i in scores.argmax(axis=1)]


def validate_classification(scores: np.ndarray, truth: list, labels: list) -> dict:
    """Metrics of the raw decision and of the decision calibrated on this split."""
    result = {"n": len(truth)}
    raw = decide(scores, labels)
    result.update({f"raw_{k}": v for k, v in metrics.classification_scores(
        truth, raw, labels=labels).items() if k in ("accuracy", "macro_f1")})
    if len(labels) == 2:
        margins = scores[:, 0] - scores[:, 1]
        positive = np.array([t == labels[0] for t in truth])
        threshold = best_threshold(margins, positive)
        calibrated = decide(scores, labels, threshold)
        cm = metrics.confusion_matrix(truth, calibrated, labels=labels)
        result.update({
            "threshold": threshold,
            "accuracy": metrics.accuracy(truth, calibrated),
            "macro_f1": metrics.macro_f1(truth, calibrated, labels=labels),
            # Each half's threshold fit on the other half: what calibration is worth unseen.
            "accuracy_cross_fitted": cross_fitted_accuracy(margins, positive),
            "auc": metrics.roc_auc(positive.astype(int), margins),
            "confusion": np.asarray(cm).tolist(),
        })
    else:
        result.update({"threshold": 0.0, "accuracy": result["raw_accuracy"],
                       "macro_f1": result["raw_macro_f1"]})
    return result


# ----------------------------------------------------------------------------- generation


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """<end_of_turn> closes a chat answer, <eos> a plain one."""
    return (tokenizer.end_of_turn_id, tokenizer.eos_id)


@functools.lru_cache(maxsize=8)
def _sampler(model: Transformer, stops: tuple[int, ...]) -> Sampler:
    # One sampler per model, so validation and test share its compiled decode loop.
    return Sampler(model, stop_ids=stops)


def generate(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: Sequence[Example], *, max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 8) -> list[str]:
    """The greedy answer to each example's prompt, in the examples' order.

    Prompts are batched by length (less padding); every batch is filled up to `batch_size`
    with copies of its first prompt so all batches share one compiled shape per length bucket.
    """
    if not examples:
        return []
    prompts = [encode_prompt(tokenizer, e.prompt, spec.style).tolist() for e in examples]
    sampler = _sampler(model, stop_ids(tokenizer))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    outputs: list[str] = [""] * len(prompts)
    groups = bucket_by_length([len(p) for p in prompts], batch_size)
    for number, group in enumerate(groups, start=1):
        batch = [prompts[i] for i in group]
        batch += [batch[0]] * (batch_size - len(batch))
        for i, ids in zip(group, sampler.generate(variables, batch, sampling), strict=False):
            outputs[i] = tokenizer.decode(ids).strip()
        if number % 10 == 0 or number == len(groups):
            log(f"generated {min(number * batch_size, len(prompts))}/{len(prompts)}")
    return outputs


def expected_script(spec: TaskSpec) -> str | None:
    """The script a translation must answer in; None: the reference's own dominant script."""
    return TARGET_SCRIPTS.get(spec.target_lang) if spec.target_lang else None


def write_table(path: Path, columns: dict[str, Sequence]) -> Path:
    """A CSV of text columns, written atomically."""
    frame = pl.DataFrame({name: [str(v) for v in values] for name, values in columns.items()},
                         schema={name: pl.String for name in columns})
    write_atomically(path, lambda tmp: frame.write_csv(tmp))
    return path


def generation_metrics(predictions: Sequence[str], references: Sequence[str],
                       spec: TaskSpec | None = None) -> dict:
    """BLEU (char tokens), chrF, chrF++, ROUGE on Hangul, and the language-mismatch rate."""
    script = expected_script(spec) if spec is not None else None
    scores = metrics.generation_scores(list(predictions), list(references),
                                       expected_script=script)
    return {"n": len(predictions), **scores, "bleu_signature": metrics.bleu_signature()}


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
    predictions = generate(model, variables, tokenizer, spec, chosen,
                           max_new_tokens=max_new_tokens, batch_size=cfg.data.batch_size)
    references = [e.answer for e in chosen]
    result = generation_metrics(predictions, references, spec)
    path = write_table(cfg.run_dir / VALIDATION_FILE, {
        "id": [e.id for e in chosen], "prediction": predictions, "reference": references})
    result["predictions_file"] = str(path)
    log(f"validation BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f} "
        f"ROUGE-L {result['rougeL']:.3f} language mismatch {result['mismatch_rate']:.1%}")
    for e, prediction in list(zip(chosen, predictions, strict=True))[:3]:
        log(f"  {e.id}: {prediction[:80]!r} (reference {e.answer[:80]!r})")
    return result


# ----------------------------------------------------------------------------- submission


def _cell_text(prediction, separator: str) -> str:
    text = str(prediction)
    if separator == "\t":  # an unquoted TSV cell cannot hold a tab or a line break
        text = " ".join(text.split())
    return text if text.strip() else EMPTY_ANSWER


def write_predictions(spec: TaskSpec, cfg: RunConfig, ids: list, predictions: list) -> Path:
    """The submission under output.submissions, validated against the sample; returns its path."""
    test = input_paths(spec, cfg.data.test, "data.test")
    first = test[0] if isinstance(test, tuple) else test
    if spec.kind == "classification":  # the test file is the sample: its separator
        sep = separator_for(first)
    else:  # the test file may be JSON: tab only for a .tsv
        sep = "\t" if first.suffix.lower() == ".tsv" else ","
    path = submission_path(spec.name, "tsv" if sep == "\t" else "csv",
                           root=cfg.output.submissions)
    id_col, label_col = spec.id_column or "id", answer_column(spec)
    if spec.kind == "classification":
        sample, domain = first, [str(k) for k in spec.label_map]
        texts = [str(p) for p in predictions]
    else:
        # No sample file for generation: the submission is the ids with their answers.
        sample, domain = pl.DataFrame({id_col: [str(i) for i in ids]}), None
        texts = [_cell_text(p, sep) for p in predictions]
        empty = [str(i) for i, p in zip(ids, predictions, strict=True) if not str(p).strip()]
        if empty:
            log(f"warning: {len(empty)} empty answers written as {EMPTY_ANSWER!r} "
                f"(ids {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})")
    frame = pl.DataFrame({id_col: [str(i) for i in ids], label_col: texts})
    write_submission(frame, path, sample=sample, id_col=id_col, label_col=label_col,
                     label_domain=domain, sep=sep)
    return path


def predict_test(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
                 cfg: RunConfig, threshold: float = 0.0, *,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    test = load_records(spec, input_paths(spec, cfg.data.test, "data.test"), labelled=False,
                        on_bad_row=cfg.data.on_bad_row)
    examples = build_examples(spec, test.frame, with_answers=False)
    log(f"predicting {len(examples)} test rows of {cfg.data.test}")
    if spec.kind == "classification":
        predictions = decide(classify(model, variables, tokenizer, spec, examples, cfg),
                             list(spec.label_map), threshold)
    else:
        predictions = generate(model, variables, tokenizer, spec, examples,
                               max_new_tokens=max_new_tokens, batch_size=cfg.data.batch_size)
    return write_predictions(spec, cfg, [e.id for e in examples], predictions)


# ----------------------------------------------------------------------------- trained model


def trained_path(cfg: RunConfig) -> Path:
    """What the run saved: the adapter directory, or the full model after full fine-tuning."""
    run_dir = cfg.run_dir
    if cfg.lora.enabled:
        adapter = run_dir / "adapter"
        if not (adapter / "lora_config.json").is_file():
            raise TrainedModelMissing(
                f"{adapter}: no trained adapter (lora_config.json missing); train first with "
                "`python -m kaggle_pipeline.train` and the same config, or point "
                "output.dir / output.name at the run")
        return adapter
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise TrainedModelMissing(
            f"{model_dir}: no fine-tuned model (lora.enabled = false); train first with "
            "`python -m kaggle_pipeline.train` and the same config")
    return model_dir


def load_trained(cfg: RunConfig) -> tuple[Transformer, dict, Tokenizer]:
    """(model, variables, tokenizer) of a finished run; TrainedModelMissing before any weight
    is read when the run saved nothing."""
    from kaggle_pipeline.export import load_adapter
    from kaggle_pipeline.loading import load_model, load_tokenizer

    trained = trained_path(cfg)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.lora.enabled:
        log(f"loading {cfg.model.checkpoint or cfg.model.preset} and the adapter {trained}")
        config, params = load_model(cfg.model, seed=cfg.train.seed)
        lora_tree, lora_cfg = load_adapter(trained, config)
        model = Transformer(config, dtype=cfg.model.dtype, lora_scale=lora_cfg.scale)
        return model, {"params": params, "lora": lora_tree}, tokenizer
    log(f"loading the fine-tuned model {trained}")
    config, params = load_model(dataclasses.replace(cfg.model, checkpoint=str(trained)))
    return Transformer(config, dtype=cfg.model.dtype), {"params": params}, tokenizer


def saved_threshold(cfg: RunConfig) -> float:
    """The binary decision threshold calibrated on validation by the training run."""
    summary = cfg.run_dir / "summary.json"
    if not summary.exists():
        return 0.0
    return float(json.loads(summary.read_text(encoding="utf-8"))
                 .get("validation", {}).get("threshold", 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from kaggle_pipeline.records import DataError
    from kaggle_pipeline.run_config import ConfigError
    from kaggle_pipeline.submission import SubmissionError
    from kaggle_pipeline.tasks import TemplateError

    try:
        cfg = load_config(args.config, args.overrides)
        spec = task_spec(cfg)
        model, variables, tokenizer = load_trained(cfg)
        threshold = saved_threshold(cfg) if spec.kind == "classification" else 0.0
        path = predict_test(model, variables, tokenizer, spec, cfg, threshold)
    # Bad input, each message naming the file, row and field: no traceback.
    except (TrainedModelMissing, ConfigError, DataError, TemplateError, SubmissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
