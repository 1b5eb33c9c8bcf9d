"""`python -m kaggle_pipeline.train [--config run.toml] [section.key=value ...]`

files -> records -> token sequences -> packed batches -> sharded train steps -> checkpoints
-> (classification) validation metrics, calibrated decision, test predictions, submission, report.
With no arguments it runs the embedded main job: LoRA on Gemma 3 270M for the AIFactory
review-sentiment task. An interrupted run resumes from its last checkpoint when started again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from kaggle_pipeline import checkpointing, sharding
from kaggle_pipeline.chat_template import encode_conversation
from kaggle_pipeline.lora import LoraConfig, count_params, init_lora
from kaggle_pipeline.loss import add_target_slots, max_targets_per_row
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.optim import make_optimizer
from kaggle_pipeline.packing import batches, num_batches, pack, target_tokens_per_batch
from kaggle_pipeline.predict import (
    classify,
    input_paths,
    log,
    predict_test,
    task_spec,
    validate_classification,
    validate_generation,
)
from kaggle_pipeline.records import DataError
from kaggle_pipeline.run_config import ConfigError, RunConfig, load_config, to_toml
from kaggle_pipeline.scoring import answer_only
from kaggle_pipeline.tasks import build_examples, load_records, train_validation_split


class Stop(Exception):
    """Training stopped early (SIGTERM or a non-finite loss); the message says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # 0: stopped on request and resumable; 1: failed


def encode_examples(examples, tokenizer, spec, loss_on: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation as (ids, targets); targets are every model turn, or only the label's
    tokens for a classification task trained with loss_on = "label"."""
    if loss_on not in ("answer", "label"):
        raise ValueError(f"data.loss_on must be 'answer' or 'label', got {loss_on!r}")
    items = []
    for example in examples:
        enc = encode_conversation(tokenizer, example.conversation, style=spec.style)
        targets = enc.target_mask
        if loss_on == "label" and spec.kind == "classification":
            targets = answer_only(targets)
        items.append((enc.ids, targets))
    return items


def lora_config(cfg: RunConfig) -> LoraConfig:
    return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      targets=tuple(cfg.lora.targets))


def check_same_run(cfg: RunConfig, run_dir: Path) -> None:
    """Resuming only makes sense for the same training settings. Without a checkpoint there is
    nothing to resume (e.g. the last attempt stopped on a data error), so any settings go."""
    saved = run_dir / "config.toml"
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoint = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if not saved.exists() or not has_checkpoint:
        return
    from kaggle_pipeline.run_config import load_config as _load

    previous = _load(saved)
    for section in ("model", "data", "lora", "optim"):
        if getattr(previous, section) != getattr(cfg, section):
            raise SystemExit(
                f"error: {run_dir} holds a run with different [{section}] settings; "
                f"use another output.name or delete {run_dir} to start over")
    if (previous.train.seed, previous.train.epochs) != (cfg.train.seed, cfg.train.epochs):
        raise SystemExit(f"error: {run_dir} holds a run with another seed/epochs; use another "
                         "output.name or delete it to start over")


def keep_metrics_until(metrics_path: Path, step: int) -> None:
    """Drop the records of steps after `step`: a run killed between checkpoints logged steps
    that its resumption takes again (and maybe half a line)."""
    if not metrics_path.exists():
        return

    def logged_before(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if logged_before(line)]
    if kept != lines:
        tmp = metrics_path.with_name(metrics_path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, metrics_path)


def write_loss_plot(metrics_path: Path, out: Path) -> None:
    from kaggle_pipeline.report import plot_loss, read_loss_curve

    # Nothing to plot when the run stopped before its first step was logged.
    if metrics_path.exists() and metrics_path.read_text(encoding="utf-8").strip():
        plot_loss(*read_loss_curve(metrics_path), out)


def run(cfg: RunConfig) -> dict:
    from kaggle_pipeline.export import save_adapter
    from kaggle_pipeline.loading import load_model, load_tokenizer

    started = time.time()
    sharding.maybe_initialize_distributed()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_run(cfg, run_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    spec = task_spec(cfg)

    log(f"reading {cfg.data.train}")
    table = load_records(spec, input_paths(spec, cfg.data.train, "data.train"),
                         on_bad_row=cfg.data.on_bad_row)
    if table.skipped:
        log(table.report())
    train_frame, valid_frame = train_validation_split(
        table.frame, validation_fraction=cfg.data.validation_fraction, seed=cfg.train.seed,
        stratify_by=spec.stratify_column)
    train_examples = build_examples(spec, train_frame)
    valid_examples = build_examples(spec, valid_frame)
    log(f"{len(train_examples)} training and {len(valid_examples)} validation examples")

    log(f"loading model {cfg.model.checkpoint or cfg.model.preset} "
        f"(params as {cfg.model.param_dtype})")
    mesh = sharding.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp, cfg.train.mesh_model)
    config, params = load_model(cfg.model, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    log(f"model: {config.family}, {config.num_layers} layers, "
        f"{count_params(params) / 1e6:.0f}M params; mesh {dict(mesh.shape)}")

    items = encode_examples(train_examples, tokenizer, spec, cfg.data.loss_on)
    # Each process packs the same rows and takes its own share of every global batch.
    rows, stats = pack(items, cfg.data.seq_len, pack_rows=cfg.data.pack)
    log(f"packed: {stats.summary()}")
    if stats.truncated:
        log(f"warning: {stats.truncated} examples longer than data.seq_len="
            f"{cfg.data.seq_len} were truncated")
    width = max_targets_per_row(rows)
    steps_per_epoch = num_batches(len(rows), cfg.data.batch_size)
    planned_steps = steps_per_epoch * cfg.train.epochs
    # max_steps only says where to stop: the schedule spans all epochs, so a run stopped at
    # max_steps and resumed with a larger one takes exactly the steps of an unbroken run.
    total_steps = min(planned_steps, cfg.train.max_steps or planned_steps)
    updates = max(1, math.ceil(planned_steps / cfg.optim.accumulate_steps))
    if planned_steps % cfg.optim.accumulate_steps:
        log(f"warning: optim.accumulate_steps={cfg.optim.accumulate_steps} does not divide the "
            f"{planned_steps} micro-batches; the last {planned_steps % cfg.optim.accumulate_steps}"
            " make no update")

    full = not cfg.lora.enabled
    lcfg = lora_config(cfg)
    model = Transformer(config, dtype=cfg.model.dtype, lora_scale=lcfg.scale,
                        lora_dropout=0.0 if full else lcfg.dropout, deterministic=False,
                        remat=cfg.model.remat)
    from kaggle_pipeline.train_step import Trainer

    trainer = Trainer(model, make_optimizer(cfg.optim, updates), mesh,
                      "full" if full else "lora", seed=cfg.train.seed,
                      accumulate_steps=cfg.optim.accumulate_steps)
    tokens_of_update = update_token_counts(rows, cfg.data.batch_size, seed=cfg.train.seed,
                                           epochs=cfg.train.epochs,
                                           accumulate_steps=cfg.optim.accumulate_steps)
    trainable = params if full else init_lora(config, lcfg, jax.random.key(cfg.train.seed))
    frozen = {} if full else jax.device_put(params, trainer.frozen_shardings(params))
    state = trainer.init_state(trainable)
    log(f"trainable: {count_params(state['trainable']) / 1e6:.3f}M params "
        f"({'full fine-tuning' if full else f'LoRA r={lcfg.rank} on {list(lcfg.targets)}'})")

    ckpts = checkpointing.Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep)
    restored = ckpts.restore_latest(state, trainer.state_shardings(state))
    if restored is not None:
        state = restored
        log(f"resumed from step {int(state['step'])}")
    step_fn = trainer.compile_step(state, frozen)

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    # SIGTERM (a preempted notebook, `kill`) and Ctrl-C both finish the step, save, and exit.
    previous_handlers = {sig: signal.signal(sig, on_sigterm)
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_path = run_dir / "metrics.jsonl"
    start_step = int(state["step"])
    keep_metrics_until(metrics_path, start_step)
    if start_step < total_steps:
        log(f"training {total_steps} steps ({cfg.train.epochs} epochs x {steps_per_epoch}); "
            "compiling the step first")
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    tokens_seen, t0 = 0, None
    try:
        with open(metrics_path, "a", encoding="utf-8") as metrics_file:
            step = start_step
            while step < total_steps:
                epoch, index = divmod(step, steps_per_epoch)
                epoch_batches = list(batches(rows, cfg.data.batch_size, seed=cfg.train.seed,
                                             epoch=epoch))
                for batch in epoch_batches[index:]:
                    if step >= total_steps:
                        break
                    real = int((batch["segment_ids"] > 0).sum())
                    device_batch = trainer.put_batch(add_target_slots(batch, width),
                                                     update_tokens=tokens_of_update[step])
                    state, m = step_fn(state, frozen, device_batch)
                    loss = float(m["loss"])
                    step += 1
                    if not math.isfinite(loss):
                        good = ckpts.latest_step()
                        kept = (f"The last good checkpoint (step {good}) is kept in "
                                f"{ckpts.directory}." if good is not None else
                                "No checkpoint had been saved yet.")
                        raise Stop(f"loss became {loss} at step {step} (epoch {epoch + 1}); "
                                   f"stopped without saving it. {kept} "
                                   "Lower optim.learning_rate or check the data.", exit_code=1)
                    if t0 is None:  # the first step includes compilation
                        t0, tokens_seen = time.time(), 0
                    else:
                        tokens_seen += real
                    rate = tokens_seen / max(time.time() - t0, 1e-9)
                    record = {"step": step, "epoch": epoch + 1, "loss": loss,
                              "grad_norm": float(m["grad_norm"]),
                              "target_tokens": int(m["target_tokens"]),
                              "tokens_per_s": round(rate, 1)}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", epoch=epoch + 1)
                    bar.update(1)
                    end_of_epoch = step % steps_per_epoch == 0
                    if stop["signal"] is not None:
                        ckpts.save(state, step)
                        raise Stop(f"stopped by signal at step {step}; checkpoint saved in "
                                   f"{ckpts.directory}. Run the same command to resume.",
                                   exit_code=0)
                    if step % cfg.train.save_every == 0 or end_of_epoch or step == total_steps:
                        ckpts.save(state, step)
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        ckpts.wait()
        write_loss_plot(metrics_path, run_dir / "loss.png")

    if full:
        from kaggle_pipeline.checkpoints.orbax_format import save_orbax

        save_orbax(jax.device_get(state["trainable"]), run_dir / "model")
        variables = {"params": state["trainable"]}
    else:
        save_adapter(jax.device_get(state["trainable"]), lcfg, run_dir / "adapter")
        variables = {"params": frozen, "lora": state["trainable"]}
    log(f"saved the {'model' if full else 'adapter'} in {run_dir}")
    summary = {"steps": int(state["step"]), "packing": vars(stats) | {
        "efficiency": stats.efficiency}, "train_seconds": round(time.time() - started, 1)}

    if cfg.train.predict:
        summary.update(evaluate_and_submit(cfg, spec, config, variables, tokenizer, valid_examples))
    summary["total_seconds"] = round(time.time() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def update_token_counts(rows: list[dict], batch_size: int, *, seed: int, epochs: int,
                        accumulate_steps: int) -> list[int]:
    """Per micro-step: the target tokens of every micro-batch of its optimizer update."""
    per_step = [n for epoch in range(epochs)
                for n in target_tokens_per_batch(rows, batch_size, seed=seed, epoch=epoch)]
    k = accumulate_steps
    return [sum(per_step[s - s % k: s - s % k + k]) for s in range(len(per_step))]


def evaluate_and_submit(cfg, spec, config, variables, tokenizer, valid_examples) -> dict:
    from kaggle_pipeline.report import write_report

    out: dict = {}
    model = Transformer(config, dtype=cfg.model.dtype, lora_scale=lora_config(cfg).scale)
    threshold = 0.0
    if spec.kind == "classification" and valid_examples:
        log(f"scoring {len(valid_examples)} validation reviews")
        labels = list(spec.label_map)
        scores = classify(model, variables, tokenizer, spec, valid_examples, cfg)
        validation = validate_classification(scores, [e.label for e in valid_examples], labels)
        threshold = validation["threshold"]
        out["validation"] = validation
        log(f"validation accuracy {validation['accuracy']:.3f} (threshold {threshold:+.3f} fit "
            f"on validation; cross-fitted {validation.get('accuracy_cross_fitted', 0):.3f}, "
            f"uncalibrated {validation['raw_accuracy']:.3f}, AUC {validation.get('auc', 0):.3f})")
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
        labels=[spec.label_map[k] for k in spec.label_map] if spec.label_map else None,
        loss_curve_jsonl=cfg.run_dir / "metrics.jsonl",
        title=f"{spec.name}: {cfg.output.name}")
    out["report"] = str(report)
    log(f"report: {report}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        run(load_config(args.config, args.overrides))
    except Stop as stop:
        print(f"\n{stop}", file=sys.stderr)
        return stop.exit_code
    except (ConfigError, DataError) as err:  # bad input: the message says where, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
