"""`python -m kaggle_pipeline.train [--config run.toml] [section.key=value ...]`

files -> records -> token sequences -> packed batches -> sharded train steps -> checkpoints
-> (classification) validation metrics, the decision (argmax or a calibrated threshold), test
predictions, submission, report.
With no arguments it runs the embedded main job: LoRA on Gemma 3 270M for the AIFactory
review-sentiment task. An interrupted run resumes from its last checkpoint when started again
(the newest intact one, if the last was damaged), as long as its identity is the same: the same
training files and base checkpoint (by content) and the same training settings; otherwise it
stops with a message saying what changed.

Exit codes: 0 done, 1 a non-finite loss, 2 a setting, file or checkpoint to fix (one line, before
any model is loaded when no model is needed to tell), 143 stopped by SIGTERM and 130 by Ctrl-C,
both after saving a checkpoint to resume from.

A run is three named parts: `prepare` (data, model, trainer, the state to resume from),
`train_loop` (steps, metrics, checkpoints, signals) and `finish` (the trained weights, then
validation, test predictions and the report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline import run_setup
from kaggle_pipeline.checkpoints.adapter import save_adapter
from kaggle_pipeline.cli import Stop, log, progress, run_command
from kaggle_pipeline.data.chat_template import encode_conversation
from kaggle_pipeline.data.packing import batches, num_batches, pack, target_tokens_per_batch
from kaggle_pipeline.data.tasks import Example, TaskSpec
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.files import write_text_atomically
from kaggle_pipeline.inference.label_scoring import answer_only
from kaggle_pipeline.model import Transformer, layer_stack, sharding
from kaggle_pipeline.model.config import ModelConfig
from kaggle_pipeline.model.lora import count_params, init_lora
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row
from kaggle_pipeline.run_config import RunConfig, load_config, to_toml
from kaggle_pipeline.training import frozen_prefix, identity
from kaggle_pipeline.training.background_compile import compile_in_background
from kaggle_pipeline.training.optimizer import make_optimizer
from kaggle_pipeline.training.step import Trainer
from kaggle_pipeline.training.train_state import Checkpoints

EXIT_FAILED = 1  # a non-finite loss


def exit_code_of(signum: int) -> int:
    """A run stopped by a signal after saving exits as the shell reports a process the signal
    ended: 128 + its number (SIGTERM 143, Ctrl-C 130), so `train && upload` stops there."""
    return 128 + signum


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


def has_checkpoint(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


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
    from kaggle_pipeline.evaluation.report import plot_loss, read_loss_curve

    # Nothing to plot when the run stopped before its first step was logged.
    if metrics_path.exists() and metrics_path.read_text(encoding="utf-8").strip():
        plot_loss(*read_loss_curve(metrics_path), out)


def update_token_counts(rows: list[dict], batch_size: int, *, seed: int, epochs: int,
                        accumulate_steps: int) -> list[int]:
    """Per micro-step: the target tokens of every micro-batch of its optimizer update."""
    per_step = [n for epoch in range(epochs)
                for n in target_tokens_per_batch(rows, batch_size, seed=seed, epoch=epoch)]
    k = accumulate_steps
    return [sum(per_step[s - s % k: s - s % k + k]) for s in range(len(per_step))]


# ----------------------------------------------------------------------------- prepare


@dataclasses.dataclass
class Run:
    """Everything the loop and the finish need, built once by `prepare`."""

    cfg: RunConfig
    spec: TaskSpec
    config: ModelConfig
    tokenizer: Tokenizer
    valid_examples: list[Example]
    test_examples: list[Example] | None  # read before training, predicted after
    rows: list[dict]
    packing: dict
    trainer: Trainer
    step_fn: Callable  # the jitted step (Trainer.compile_step)
    step_compiled: Future  # its compilation for the run's shapes, started in `prepare`
    frozen: dict
    state: dict
    checkpoints: Checkpoints
    steps_per_epoch: int
    total_steps: int
    target_width: int  # target slots per row, fixed for the run
    tokens_of_update: list[int]

    @property
    def full(self) -> bool:
        return not self.cfg.lora.enabled


def check_inputs(cfg: RunConfig, spec: TaskSpec,
                 examples: tuple[list[Example], list[Example]] | None = None):
    """Everything that can be checked without the model, before it is loaded: the train, test
    and sample files, the tokenizer, the mesh, the run directory's identity. Returns (train,
    validation and test examples, tokenizer, mesh, identity). `examples` (train, validation)
    when the caller has read them already (the folds of a cross-validation)."""
    train_examples, valid_examples = examples or run_setup.read_examples(cfg, spec)
    test_examples = None
    if cfg.train.predict and cfg.data.test:
        test_examples = run_setup.read_test(cfg, spec)
        log(f"{len(test_examples)} test rows to predict after training")
    elif cfg.train.predict:
        log("data.test is empty: validation only, no submission")
    tokenizer = run_setup.load_tokenizer(cfg.model)
    run_setup.check_tokenizer_alone(tokenizer, spec.style)
    mesh = run_setup.build_mesh(cfg)
    if cfg.model.scan_layers and cfg.lora.last_layers:  # before the model loads
        run_setup.check_adapted_layers(cfg.lora, run_setup.model_config(cfg.model), cfg.model)
    current = run_setup.check_run_identity(cfg, spec, has_checkpoint=has_checkpoint(cfg.run_dir))
    return train_examples, valid_examples, test_examples, tokenizer, mesh, current


def load_base(cfg: RunConfig, mesh=None, config: ModelConfig | None = None
              ) -> tuple[ModelConfig, dict]:
    """The frozen base model's (config, params), each tensor placed on `mesh` (default: the
    run's mesh) as it is read. `config`: the model's config when already read
    (`run_setup.model_config`)."""
    mesh = run_setup.build_mesh(cfg) if mesh is None else mesh
    compute_dtype, param_dtype = run_setup.dtypes(cfg.model, mesh)
    log(f"loading model {cfg.model.checkpoint or cfg.model.preset} onto mesh "
        f"{dict(mesh.shape)} (params as {param_dtype.name}, compute in {compute_dtype.name})")
    return run_setup.load_model(cfg.model, seed=cfg.train.seed, mesh=mesh, config=config)


def start_compiling(cfg: RunConfig, config: ModelConfig, trainer: Trainer, first: int,
                    target_width: int) -> tuple[Callable, Future, Callable | None, Future | None]:
    """Starts compiling, on another thread, the programs the run calls, for their arguments'
    shapes (the weights as the loader will place them): the frozen layers' (`first` > 0) first,
    since it runs first, then the train step. Returns (the jitted step, its compilation, the
    jitted frozen layers or None, their compilation or None)."""
    full, mesh = not cfg.lora.enabled, trainer.mesh
    params_shapes, lora_shapes = run_setup.abstract_variables(cfg, config, mesh)
    below, below_compiled = None, None
    if first:
        below = frozen_prefix.below_fn(trainer.model, first)
        below_compiled = compile_in_background(below, params_shapes, *frozen_prefix.abstract_rows(
            cfg.data.batch_size, cfg.data.seq_len, mesh))
    # Full fine-tuning trains an f32 copy of the weights (the master copy).
    trainable_shapes = lora_shapes if not full else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params_shapes)
    state_shapes = trainer.abstract_state(trainable_shapes)
    frozen_shapes = {} if full else params_shapes
    step_fn = trainer.compile_step(state_shapes, frozen_shapes)
    step_compiled = compile_in_background(
        step_fn, state_shapes, frozen_shapes,
        trainer.abstract_batch(cfg.data.batch_size, cfg.data.seq_len, target_width))
    return step_fn, step_compiled, below, below_compiled


def prepare(cfg: RunConfig, examples: tuple[list[Example], list[Example]] | None = None,
            base: tuple[ModelConfig, dict] | None = None) -> Run:
    """`examples` (train, validation) and the `base` model's (config, params) when the caller
    has them already (the folds of a cross-validation); else read and loaded here.

    Everything that does not need the weights comes first: the rows, the trainer and the
    shapes of its step, which compiles on another thread while this one reads the weights
    (training/background_compile.py)."""
    sharding.maybe_initialize_distributed()
    run_dir = cfg.run_dir
    spec = run_setup.task_spec(cfg)
    train_examples, valid_examples, test_examples, tokenizer, mesh, current = \
        check_inputs(cfg, spec, examples)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "config.toml", to_toml(cfg))
    identity.save(run_dir, current)
    config = base[0] if base else run_setup.model_config(cfg.model)
    run_setup.check_tokenizer(tokenizer, config, spec.style)

    items = encode_examples(train_examples, tokenizer, spec, cfg.data.loss_on)
    # Each process packs the same rows and takes its own share of every global batch.
    rows, stats = pack(items, cfg.data.seq_len, pack_rows=cfg.data.pack)
    log(f"packed: {stats.summary()}")
    if stats.truncated:
        log(f"warning: {stats.truncated} examples longer than data.seq_len="
            f"{cfg.data.seq_len} were truncated")
    steps_per_epoch = num_batches(len(rows), cfg.data.batch_size)
    planned_steps = steps_per_epoch * cfg.train.epochs
    # max_steps only says where to stop: the schedule spans all epochs, so a run stopped at
    # max_steps and resumed with a larger one takes exactly the steps of an unbroken run.
    total_steps = min(planned_steps, cfg.train.max_steps or planned_steps)
    accumulate = cfg.optim.accumulate_steps
    updates = max(1, math.ceil(planned_steps / accumulate))
    if planned_steps % accumulate:
        log(f"warning: optim.accumulate_steps={accumulate} does not divide the "
            f"{planned_steps} micro-batches; the last {planned_steps % accumulate} make no "
            "update")

    full = not cfg.lora.enabled
    lcfg = cfg.lora
    model = run_setup.transformer(cfg.model, config, mesh, lora_scale=lcfg.scale,
                                  lora_dropout=0.0 if full else lcfg.dropout,
                                  deterministic=False)
    first = frozen_prefix.first_layer(lcfg, config, scan_layers=cfg.model.scan_layers) \
        if cfg.train.cache_frozen_layers else 0
    stream_bytes = frozen_prefix.stream_bytes(rows, config) if first else 0
    if stream_bytes > frozen_prefix.HOST_BUDGET_BYTES:
        log(f"the frozen layers' output would take {stream_bytes / 2**30:.1f} GiB of host "
            "memory: every step runs them instead")
        first = 0
    trainer = Trainer(model, make_optimizer(cfg.optim, updates), mesh,
                      "full" if full else "lora", seed=cfg.train.seed,
                      accumulate_steps=accumulate, first_layer=first)
    target_width = max_targets_per_row(rows)

    step_fn, step_compiled, below, below_compiled = start_compiling(
        cfg, config, trainer, first, target_width)

    def weights() -> dict:
        return base[1] if base else load_base(cfg, mesh, config)[1]

    # A LoRA state needs no weights either: it is made while the programs compile.
    params = weights() if full else None
    if full:  # trained in f32 (the master copy), whatever the frozen base is stored in
        trainable = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    else:
        trainable = run_setup.place_lora(
            init_lora(config, lcfg, jax.random.key(cfg.train.seed)), lcfg, config, cfg.model)
    state = trainer.init_state(trainable)
    adapted = lcfg.layers(config.num_layers)
    if not full and lcfg.last_layers >= config.num_layers:
        log(f"lora.last_layers = {lcfg.last_layers}: the model has {config.num_layers} layers, "
            "every one is adapted")
    where = "" if len(adapted) == config.num_layers else \
        f" of layers {adapted.start}-{adapted.stop - 1}"
    log(f"trainable: {count_params(state['trainable']) / 1e6:.3f}M params "
        f"({'full fine-tuning' if full else f'LoRA r={lcfg.rank} on {list(lcfg.targets)}{where}'})")
    if params is None:
        params = weights()
    log(f"model: {config.family}, {config.num_layers} layers, "
        f"{count_params(params) / 1e6:.0f}M params")
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep)
    restored = checkpoints.restore_latest(state, trainer.state_shardings(state))
    if restored is not None:
        state = restored
        log(f"resumed from step {int(state['step'])}")
    frozen = {} if full else params
    if first and int(state["step"]) < total_steps:
        started = time.time()
        below_compiled.result()
        streams = frozen_prefix.row_streams(below, params, rows, cfg.data.batch_size, mesh)
        rows = [{**row, "stream": stream} for row, stream in zip(rows, streams, strict=True)]
        log(f"layers 0-{first - 1} take no gradient: their output for the {len(rows)} rows "
            f"computed once ({time.time() - started:.0f} s); each step runs layers {first}-"
            f"{config.num_layers - 1}")
    return Run(cfg=cfg, spec=spec, config=config, tokenizer=tokenizer,
               valid_examples=valid_examples, test_examples=test_examples, rows=rows,
               packing=vars(stats) | {"efficiency": stats.efficiency}, trainer=trainer,
               step_fn=step_fn, step_compiled=step_compiled,
               frozen=frozen, state=state, checkpoints=checkpoints,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               target_width=target_width,
               tokens_of_update=update_token_counts(
                   rows, cfg.data.batch_size, seed=cfg.train.seed, epochs=cfg.train.epochs,
                   accumulate_steps=accumulate))


# ----------------------------------------------------------------------------- the loop


def _batches_from(run: Run, step: int):
    """(step, host batch) from `step` to the end of the run, epoch after epoch."""
    cfg = run.cfg
    while step < run.total_steps:
        epoch, index = divmod(step, run.steps_per_epoch)
        epoch_batches = list(batches(run.rows, cfg.data.batch_size, seed=cfg.train.seed,
                                     epoch=epoch))
        for batch in epoch_batches[index:]:
            if step >= run.total_steps:
                return
            yield step, batch
            step += 1


def _non_finite(run: Run, loss: float, step: int) -> Stop:
    good = run.checkpoints.latest_step()
    kept = (f"The last good checkpoint (step {good}) is kept in {run.checkpoints.directory}."
            if good is not None else "No checkpoint had been saved yet.")
    epoch = (step - 1) // run.steps_per_epoch + 1
    return Stop(f"loss became {loss} at step {step} (epoch {epoch}); stopped without saving "
                f"it. {kept} Lower optim.learning_rate or check the data.", EXIT_FAILED)


class _Signals:
    """SIGTERM (a preempted notebook, `kill`) and Ctrl-C both let the step finish; the loop
    then saves and stops."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._on_signal)
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _on_signal(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_loop(run: Run) -> dict:
    """Runs the steps left; returns the final state. Checkpoints every `save_every` steps, at
    each epoch's end and at the last step; a signal saves and stops."""
    cfg, trainer, state = run.cfg, run.trainer, run.state
    step_fn = run.step_fn
    run.step_compiled.result()  # compiled meanwhile: the first step runs at once
    metrics_path = cfg.run_dir / "metrics.jsonl"
    start_step = int(state["step"])
    keep_metrics_until(metrics_path, start_step)
    if start_step < run.total_steps:
        log(f"training {run.total_steps} steps ({cfg.train.epochs} epochs x "
            f"{run.steps_per_epoch})")
    bar = progress(run.total_steps, "train", unit="step", initial=start_step)
    tokens_seen, t0 = 0, None
    try:
        with _Signals() as signals, open(metrics_path, "a", encoding="utf-8") as metrics_file:
            for index, batch in _batches_from(run, start_step):
                device_batch = trainer.put_batch(add_target_slots(batch, run.target_width),
                                                 update_tokens=run.tokens_of_update[index])
                state, m = step_fn(state, run.frozen, device_batch)
                step, loss = index + 1, float(m["loss"])
                if not math.isfinite(loss):
                    raise _non_finite(run, loss, step)
                if t0 is None:  # the first step includes compilation
                    t0 = time.time()
                else:
                    tokens_seen += int((batch["segment_ids"] > 0).sum())
                rate = tokens_seen / max(time.time() - t0, 1e-9)
                epoch = index // run.steps_per_epoch + 1
                record = {"step": step, "epoch": epoch, "loss": loss,
                          "grad_norm": float(m["grad_norm"]),
                          "target_tokens": int(m["target_tokens"]),
                          "tokens_per_s": round(rate, 1)}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", epoch=epoch)
                bar.update(1)
                if signals.received is not None:
                    run.checkpoints.save(state, step)
                    name = signal.Signals(signals.received).name
                    raise Stop(f"stopped by {name} at step {step}; checkpoint saved in "
                               f"{run.checkpoints.directory}. Run the same command to resume.",
                               exit_code_of(signals.received))
                if (step % cfg.train.save_every == 0 or step % run.steps_per_epoch == 0
                        or step == run.total_steps):
                    run.checkpoints.save(state, step)
    finally:
        bar.close()
        run.checkpoints.wait()
        write_loss_plot(metrics_path, cfg.run_dir / "loss.png")
    return state


# ----------------------------------------------------------------------------- finish


def save_trained(run: Run, state: dict) -> tuple[Transformer, dict]:
    """Writes the adapter (or the full model and its config) to the run dir; returns the
    inference model and its variables."""
    cfg = run.cfg
    # Files keep the per-layer layout whatever the model's (scan_layers stacks the layers).
    saved = layer_stack.unstack(jax.device_get(state["trainable"]), run.config)
    if run.full:
        from kaggle_pipeline.checkpoints.orbax_format import save_orbax

        # The config first: the weights' shapes need not be a known preset's.
        run_setup.save_model_config(run.config, cfg.run_dir / run_setup.MODEL_CONFIG_FILE)
        save_orbax(saved, cfg.run_dir / "model")
        variables = {"params": state["trainable"]}
    else:
        save_adapter(saved, cfg.lora, cfg.run_dir / "adapter")
        variables = {"params": run.frozen, "lora": state["trainable"]}
    log(f"saved the {'model' if run.full else 'adapter'} in {cfg.run_dir}")
    model = run_setup.transformer(cfg.model, run.config, run.trainer.mesh,
                                  lora_scale=cfg.lora.scale)
    return model, variables


def finish(run: Run, state: dict, started: float) -> dict:
    """Saves what was trained, then (train.predict) validates, predicts the test file and writes
    the report; returns the run's summary, also written to summary.json."""
    cfg = run.cfg
    model, variables = save_trained(run, state)
    summary = {"steps": int(state["step"]), "packing": run.packing,
               "train_seconds": round(time.time() - started, 1)}
    if cfg.train.predict:
        from kaggle_pipeline.predict import evaluate_and_submit

        summary.update(evaluate_and_submit(cfg, run.spec, model, variables, run.tokenizer,
                                           run.valid_examples, test_examples=run.test_examples))
    summary["total_seconds"] = round(time.time() - started, 1)
    if "submission" in summary:
        summary["submissions"] = [summary["submission"]]
    write_text_atomically(cfg.run_dir / "summary.json",
                          json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def run(cfg: RunConfig) -> dict:
    if cfg.train.folds > 1:
        from kaggle_pipeline.cross_validation import cross_validate

        return cross_validate(cfg)
    started = time.time()
    prepared = prepare(cfg)
    state = train_loop(prepared)
    return finish(prepared, state, started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    return run_command(lambda: run(load_config(args.config, args.overrides)))

if __name__ == "__main__":
    raise SystemExit(main())
