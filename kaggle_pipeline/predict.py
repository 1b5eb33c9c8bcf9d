"""Trained model -> predictions -> a submission file (and validation metrics).

`python -m kaggle_pipeline.predict --config <file>` loads the base model and the run's adapter
(`<output.dir>/<output.name>/adapter`), predicts the task's test file and writes
`submissions/<task>-<timestamp>.<csv|tsv>` in the format of the competition's sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_pipeline import metrics
from kaggle_pipeline.chat_template import encode_prompt
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.run_config import RunConfig, load_config, resolve_input
from kaggle_pipeline.sampler import Sampler, SamplingConfig
from kaggle_pipeline.scoring import best_threshold, cross_fitted_accuracy, score_labels
from kaggle_pipeline.submission import submission_path, write_submission
from kaggle_pipeline.tasks import Example, TaskSpec, build_examples, get_task, load_records
from kaggle_pipeline.tokenizer import Tokenizer


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def generate(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: list[Example], max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    sampler = Sampler(model, stop_ids=[tokenizer.end_of_turn_id, tokenizer.eos_id])
    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, e.prompt, spec.style).tolist() for e in chunk]
        for ids in sampler.generate(variables, prompts, SamplingConfig(max_new_tokens)):
            outputs.append(tokenizer.decode(ids).strip())
    return outputs


def write_predictions(spec: TaskSpec, cfg: RunConfig, ids: list, predictions: list) -> Path:
    sample = resolve_input(cfg.data.test)
    ext = "tsv" if sample.suffix.lower() == ".tsv" else "csv"
    path = submission_path(spec.name, ext, root=cfg.output.submissions)
    label_col = spec.label_column or "prediction"
    frame = pl.DataFrame({spec.id_column or "id": [str(i) for i in ids],
                          label_col: [str(p) for p in predictions]})
    domain = [str(k) for k in spec.label_map] if spec.label_map else None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_submission(frame, path, sample=sample, id_col=spec.id_column or "id",
                     label_col=label_col, label_domain=domain)
    return path


def predict_test(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
                 cfg: RunConfig, threshold: float = 0.0) -> Path:
    test = load_records(spec, resolve_input(cfg.data.test), labelled=False,
                        on_bad_row=cfg.data.on_bad_row)
    examples = build_examples(spec, test.frame, with_answers=False)
    log(f"predicting {len(examples)} test rows of {cfg.data.test}")
    if spec.kind == "classification":
        predictions = decide(classify(model, variables, tokenizer, spec, examples, cfg),
                             list(spec.label_map), threshold)
    else:
        predictions = generate(model, variables, tokenizer, spec, examples)
    return write_predictions(spec, cfg, [e.id for e in examples], predictions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from kaggle_pipeline.export import load_adapter
    from kaggle_pipeline.loading import load_model, load_tokenizer

    spec = get_task(cfg.data.task)
    log(f"loading {cfg.model.checkpoint or cfg.model.preset}")
    config, params = load_model(cfg.model, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    adapter_dir = cfg.run_dir / "adapter"
    if not adapter_dir.exists():
        print(f"error: no trained adapter at {adapter_dir}; run kaggle_pipeline.train first",
              file=sys.stderr)
        return 2
    lora_tree, lora_cfg = load_adapter(adapter_dir)
    model = Transformer(config, dtype=cfg.model.dtype, lora_scale=lora_cfg.scale)
    variables = {"params": params, "lora": lora_tree}
    threshold = 0.0
    summary = cfg.run_dir / "summary.json"
    if summary.exists():
        threshold = json.loads(summary.read_text()).get("validation", {}).get("threshold", 0.0)
    path = predict_test(model, variables, tokenizer, spec, cfg, threshold)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
