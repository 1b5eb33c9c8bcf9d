"""End-to-end runs of `python -m kaggle_pipeline.train` on a tiny random Gemma 3 (the real 262k
vocabulary and tokenizer) and a slice of the real tarr data: exact resumption, SIGTERM,
non-finite loss, config errors, outputs, full fine-tuning, bad training rows.

Every LoRA run shares one config (shapes, optimizer, epochs), so the step compiles once; a
persistent compilation cache shared with the subprocess runs keeps the file fast.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from kaggle_pipeline import run_setup, train
from kaggle_pipeline.run_config import PROJECT_DIR, ConfigError, RunConfig, load_config, to_toml
from kaggle_pipeline.submission import read_sample
from kaggle_pipeline.training.step import Trainer

# 20 reviews -> 16 training + 4 validation; two reviews fit in a 128-token row, so 8 rows make
# 4 batches of 2: an epoch is 4 steps and step 3 is in the middle of the first one.
TRAIN_REVIEWS = 20
TEST_REVIEWS = 6
STEPS_PER_EPOCH = 4
EPOCHS = 2
PLANNED_STEPS = STEPS_PER_EPOCH * EPOCHS
# warmup_steps=1: the learning-rate schedule moves at every step, so a schedule that depended
# on where the run stopped would break exact resumption.
SHARED = ["model.checkpoint=", "model.preset=tiny-gemma3", "data.seq_len=128",
          "data.batch_size=2", "data.validation_fraction=0.2", f"train.epochs={EPOCHS}",
          "optim.warmup_steps=1"]
CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: Path
    train: Path
    test: Path
    jax_cache: Path

    def args(self, name: str, *extra: str) -> list[str]:
        """CLI overrides for a run named `name` on the slice of tarr, writing under root."""
        return [*SHARED, f"data.train={self.train}", f"data.test={self.test}",
                f"output.dir={self.root / 'runs'}", f"output.name={name}",
                f"output.submissions={self.root / 'submissions' / name}", *extra]

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def cli(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of a CLI run in a subprocess: this checkout's
        package, the shared compilation cache."""
        checkout = str(Path(train.__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "JAX_COMPILATION_CACHE_DIR": str(self.jax_cache),
               "JAX_PLATFORMS": "cpu",
               **{name.upper(): str(value) for name, value in CACHE_SETTINGS.items()}}
        return [sys.executable, "-m", "kaggle_pipeline.train"], env


def _head(source: Path, out: Path, rows: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """Data slices in a temp dir, a persistent compilation cache, and the tokenizer read from
    the GGUF once per module instead of once per run."""
    root = tmp_path_factory.mktemp("train_run")
    data = PROJECT_DIR / "data" / "tarr"
    space = Workspace(root, _head(data / "train.tsv", root / "train.tsv", TRAIN_REVIEWS),
                      _head(data / "test.tsv", root / "test.tsv", TEST_REVIEWS),
                      root / "jax_cache")
    saved = {name: getattr(jax.config, name)
             for name in ("jax_compilation_cache_dir", *CACHE_SETTINGS)}
    jax.config.update("jax_compilation_cache_dir", str(space.jax_cache))
    for name, value in CACHE_SETTINGS.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up once per process: start it afresh
    patch = pytest.MonkeyPatch()
    patch.setattr(run_setup, "load_tokenizer", functools.cache(run_setup.load_tokenizer))
    yield space
    patch.undo()
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        return list(manager.all_steps())


def _saved_state(run_dir: Path, step: int | None = None) -> dict:
    """A training checkpoint as host arrays: {"step", "trainable", "opt_state"}."""
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        step = manager.latest_step() if step is None else step
        return manager.restore(step, args=ocp.args.StandardRestore())


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def straight(ws) -> Path:
    """6 steps without a break, no prediction."""
    assert train.main(ws.args("straight", "train.max_steps=6", "train.predict=false")) == 0
    return ws.run_dir("straight")


# ----------------------------------------------------------------------------- 1. resumption


def test_stop_at_max_steps_then_resume_equals_an_unbroken_run(ws, straight, capsys):
    capsys.readouterr()
    args = ws.args("resumed", "train.predict=false")
    run_dir = ws.run_dir("resumed")
    assert train.main([*args, "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"({EPOCHS} epochs x {STEPS_PER_EPOCH})" in out  # so step 3 is mid-epoch
    assert _checkpoint_steps(run_dir) == [3]
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]
    # A run killed after logging step 4 but before checkpointing it: its resumption takes
    # step 4 again, and the log must not hold it twice (nor this torn last line).
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 4, "epoch": 1, "loss": 99.0}) + '\n{"step": 5, "lo')

    assert train.main([*args, "train.max_steps=6"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out

    unbroken, resumed = _metrics(straight), _metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in resumed] == [1, 1, 1, 1, 2, 2]
    # Same batches in the same order, same learning rates: the same losses, bit for bit.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in unbroken]
    assert len({r["loss"] for r in unbroken}) == 6  # the steps did see different batches
    a, b = _saved_state(straight), _saved_state(run_dir)
    assert int(a["step"]) == int(b["step"]) == 6
    _assert_trees_equal(a["trainable"], b["trainable"])
    _assert_trees_equal(a["opt_state"], b["opt_state"])
    # ... and the last two steps did move the adapter.
    mid = _saved_state(straight, 4)["trainable"]
    assert not np.array_equal(mid["layer_0"]["attn"]["q"]["b"], a["trainable"]["layer_0"]
                              ["attn"]["q"]["b"])


def test_lora_on_the_last_layers_computes_the_frozen_ones_once_and_resumes_exactly(
        ws, capsys):
    """lora.last_layers=2 of tiny-gemma3's 4: factors for layers 2 and 3 only; layers 0-1 run
    once per row (frozen_prefix), with the losses of the step that runs them every time; a run
    stopped at step 3 and resumed computes the streams again and equals the unbroken one bit
    for bit; predict reads the adapter back."""
    from kaggle_pipeline import predict
    from kaggle_pipeline.checkpoints.adapter import load_adapter

    capsys.readouterr()
    last = ["lora.last_layers=2", "train.max_steps=6"]
    assert train.main(ws.args("last2", *last)) == 0
    out = capsys.readouterr().out
    assert "layers 0-1 take no gradient: their output for the 7 rows computed once" in out
    assert train.main(ws.args("last2-every-step", *last, "train.predict=false",
                              "train.cache_frozen_layers=false")) == 0
    assert "computed once" not in capsys.readouterr().out
    cached, every_step = _metrics(ws.run_dir("last2")), _metrics(ws.run_dir("last2-every-step"))
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in every_step],
                                                        rel=1e-5)
    assert len({r["loss"] for r in cached}) == 6

    adapter, lora_config = load_adapter(ws.run_dir("last2") / "adapter")
    assert sorted(adapter) == ["layer_2", "layer_3"] and lora_config.last_layers == 2
    resumed_args = ws.args("last2-resumed", "lora.last_layers=2", "train.predict=false")
    assert train.main([*resumed_args, "train.max_steps=3"]) == 0
    assert train.main([*resumed_args, "train.max_steps=6"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert [r["loss"] for r in _metrics(ws.run_dir("last2-resumed"))] == [r["loss"]
                                                                         for r in cached]
    _assert_trees_equal(_saved_state(ws.run_dir("last2"))["trainable"],
                        _saved_state(ws.run_dir("last2-resumed"))["trainable"])

    trained = Path(json.loads((ws.run_dir("last2") / "summary.json").read_text())["submission"])
    again = predict.predict(load_config(None, ws.args("last2", *last)))
    assert again.read_text(encoding="utf-8") == trained.read_text(encoding="utf-8")


def test_the_programs_compiled_while_the_weights_load_are_the_ones_the_run_calls(ws, caplog):
    """prepare compiles the train step and the frozen layers' program on another thread while
    the weights load (training/background_compile.py): each is compiled once, and the loop's
    first step finds the step compiled instead of tracing it again."""
    cfg = load_config(None, ws.args("ahead", "lora.last_layers=2", "train.max_steps=2",
                                    "train.predict=false"))
    jax.config.update("jax_log_compiles", True)  # for every thread: the context is per thread
    try:
        with caplog.at_level(logging.WARNING):
            run = train.prepare(cfg)
            run.step_compiled.result()
            lowered_before_the_loop = _lowered(caplog.records)
            caplog.clear()
            train.train_loop(run)
            lowered_in_the_loop = _lowered(caplog.records)
    finally:
        jax.config.update("jax_log_compiles", False)
    assert lowered_before_the_loop.count("step") == 1
    assert lowered_before_the_loop.count("below") == 1
    assert "step" not in lowered_in_the_loop
    assert [r["step"] for r in _metrics(ws.run_dir("ahead"))] == [1, 2]


def _lowered(records) -> list[str]:
    """The jitted functions that jax's compile log says were lowered ('Compiling jit(f) ...')."""
    return [m.group(1) for r in records
            if (m := re.match(r"Compiling jit\((\w+)\)", r.getMessage()))]


def test_lora_last_layers_with_scanned_layers_is_refused_before_the_model_loads(
        ws, monkeypatch, capsys):
    """Some layers frozen cannot be scanned; last_layers at least the depth adapts them all."""
    _no_model(monkeypatch)
    assert train.main(ws.args("last-scanned", "lora.last_layers=2",
                              "model.scan_layers=true")) == 2
    assert capsys.readouterr().err == (
        "error: lora.last_layers = 2 (LoRA on the last 2 of 4 layers) needs model.scan_layers "
        "= false: the scanned layers share one LoRA shape. Set lora.last_layers = 0 to adapt "
        "every layer\n")
    _nothing_written(ws, "last-scanned")


# ----------------------------------------------------------------------------- 2. SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_exits_128_plus_its_number_and_resumes(ws, straight, capsys,
                                                                            signum):
    """SIGTERM (a preempted notebook) exits 143 and Ctrl-C 130, as a shell reports a process the
    signal ended: `train && upload` must not go on."""
    name = signum.name.lower()
    args = ws.args(name, "train.predict=false")
    run_dir = ws.run_dir(name)
    command, env = ws.cli()
    with open(ws.root / f"{name}.out", "w") as out, open(ws.root / f"{name}.err", "w") as err:
        proc = subprocess.Popen([*command, *args], cwd=ws.root, env=env, stdout=out, stderr=err)
        try:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.time() + 180
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                assert proc.poll() is None, (ws.root / f"{name}.err").read_text()
                assert time.time() < deadline, "no step finished in 180 s"
                time.sleep(0.02)
            proc.send_signal(signum)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (ws.root / f"{name}.err").read_text()
    assert returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], stderr
    found = re.search(rf"stopped by {signum.name} at step (\d+); checkpoint saved in (\S+)\. "
                      r"Run the same command to resume\.", stderr)
    assert found, stderr
    stopped = int(found.group(1))
    assert 1 <= stopped < PLANNED_STEPS
    assert Path(found.group(2)) == run_dir / "checkpoints"
    assert "Traceback" not in stderr
    assert _checkpoint_steps(run_dir)[-1] == stopped
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, stopped + 1))
    assert not (run_dir / "adapter").exists()  # it stopped before the end of training

    capsys.readouterr()
    assert train.main(args) == 0
    assert f"resumed from step {stopped}" in capsys.readouterr().out
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, PLANNED_STEPS + 1))
    assert _checkpoint_steps(run_dir)[-1] == PLANNED_STEPS
    assert (run_dir / "adapter").is_dir()
    # The same run as `straight` (only max_steps differs), computed across a process restart.
    assert [r["loss"] for r in records[:6]] == pytest.approx(
        [r["loss"] for r in _metrics(straight)], rel=1e-6)


# ----------------------------------------------------------------------------- 3. NaN


@pytest.mark.parametrize("bad_step", [3, 1])
def test_non_finite_loss_stops_without_saving_it(ws, monkeypatch, capsys, bad_step):
    """The step is the real one, except that at `bad_step` its loss and new params are NaN:
    a checkpoint written after that would hold NaN params."""
    compile_step = Trainer.compile_step

    def poisoned(self, state, frozen):
        step_fn = compile_step(self, state, frozen)

        def step(state, frozen, batch):
            state, metrics = step_fn(state, frozen, batch)
            if int(state["step"]) == bad_step:
                state = {**state, "trainable": jax.tree.map(lambda x: x * np.nan,
                                                            state["trainable"])}
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            return state, metrics

        step.lower = step_fn.lower  # compiled ahead by prepare like the real one
        return step

    monkeypatch.setattr(Trainer, "compile_step", poisoned)
    name = f"nan-at-{bad_step}"
    run_dir = ws.run_dir(name)
    capsys.readouterr()
    assert train.main(ws.args(name, "train.save_every=1")) == 1
    stderr = capsys.readouterr().err
    assert f"loss became nan at step {bad_step} (epoch 1); stopped without saving it." in stderr
    assert "Lower optim.learning_rate" in stderr
    good = list(range(1, bad_step))
    if good:
        assert (f"The last good checkpoint (step {good[-1]}) is kept in "
                f"{run_dir / 'checkpoints'}.") in stderr
        assert _checkpoint_steps(run_dir) == good
        last = _saved_state(run_dir)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(last["trainable"]))
    else:
        assert "No checkpoint had been saved yet." in stderr
        assert _checkpoint_steps(run_dir) == []
    assert [r["step"] for r in _metrics(run_dir)] == good
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "summary.json").exists()


# ----------------------------------------------------------------------------- 4. config


@pytest.mark.parametrize("argv, message", [
    (["nosuch.key=1"], "unknown config section(s) ['nosuch']; known: ['data', 'lora', "
                       "'model', 'optim', 'output', 'task', 'train']"),
    (["train.nosuch=1"], "config section [train]: unknown key(s) ['nosuch']; known: "
                         "['cache_frozen_layers', 'epochs', 'folds', 'keep', 'max_steps', "
                         "'mesh_data', 'mesh_fsdp', "
                         "'mesh_model', "
                         "'predict', 'refit', 'save_every', 'seed']"),
    (["train.epochs"], "override 'train.epochs': expected section.key=value"),
    (["epochs=3"], "override 'epochs=3': expected section.key=value"),
    (["train.epochs=three"], "train.epochs: expected an integer, got 'three'"),
    (["optim.learning_rate=fast"], "optim.learning_rate: expected a number, got 'fast'"),
    (["train.predict=maybe"], "train.predict: expected true or false, got 'maybe'"),
    (['lora.targets=["q",'], "lora.targets: expected a list like [\"q\", \"v\"] or q,v, got "
                             "'[\"q\",' (Invalid value (at end of document))"),
])
def test_bad_overrides_are_clear_errors(argv, message, capsys):
    assert train.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert captured.out == ""  # nothing ran


def test_bad_config_files_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    broken = tmp_path / "broken.toml"
    broken.write_text("[train]\nepochs = \n", encoding="utf-8")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text("[lora]\nrank = 4\nranks = 8\n", encoding="utf-8")
    not_a_table = tmp_path / "flat.toml"
    not_a_table.write_text("train = 3\n", encoding="utf-8")
    cases = [(missing, f"config file not found: {missing}"),
             (broken, f"{broken}: not valid TOML: "),
             (unknown_key, "config section [lora]: unknown key(s) ['ranks']"),
             (not_a_table, f"{not_a_table}: ['train'] must be [section] tables")]
    for path, message in cases:
        assert train.main(["--config", str(path)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(missing)


EVERY_FIELD = """\
[model]
checkpoint = "ckpt/gemma-2b"
preset = "gemma2-2b"
tokenizer = "tok/tokenizer.model"
dtype = "bfloat16"
param_dtype = "bfloat16"
remat = true
remat_policy = "dots"
scan_layers = true
attention_chunk = 512

[data]
task = ""
prompt = "Review: {comment}"
train = "a/train.csv"
test = "a/test.csv"
validation_fraction = 0.125
seq_len = 512
batch_size = 16
loss_on = "answer"
on_bad_row = "skip"
pack = false
max_prompt_len = 1024

[task]
kind = "generation"
format = "csv"
id_column = "key"
prompt = "Review: {comment}"
turns_column = "turns"
system = "Answer briefly.\\nIn English."
label_column = "sentiment"
labels = { "1" = "good", "0" = "bad \\"quoted\\"" }
answer = "{summary}"
max_new_tokens = 32
temperature = 0.0
top_k = 40
top_p = 0.9
source_language = "ko"
target_language = "en"
metric = "chrf"
submission_columns = ["key", "summary"]
sample_submission = "a/sample_submission.csv"
validation_size = 50
decision = "threshold"

[lora]
enabled = false
rank = 4
alpha = 24
dropout = 0.05
targets = ["q", "v", "gate"]
last_layers = 3

[optim]
learning_rate = 3e-5
schedule = "linear"
warmup_steps = 7
weight_decay = 0.01
b1 = 0.8
b2 = 0.95
clip_norm = "none"
accumulate_steps = 4
end_lr_fraction = 0.1

[train]
epochs = 5
seed = 42
max_steps = 100
save_every = 10
keep = 3
mesh_data = 2
mesh_fsdp = 4
mesh_model = 2
predict = false
folds = 4
refit = true
cache_frozen_layers = false

[output]
dir = "out"
name = "my-run"
submissions = "subs"
"""


def test_a_file_with_every_field_round_trips(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(EVERY_FIELD, encoding="utf-8")
    cfg = load_config(path)
    default = RunConfig()
    # data.validation excludes train.folds (checked at load): it has a file of its own below.
    for section in dataclasses.fields(RunConfig):
        ours, theirs = getattr(cfg, section.name), getattr(default, section.name)
        for field in dataclasses.fields(ours):
            if (section.name, field.name) == ("data", "validation"):
                continue
            assert getattr(ours, field.name) != getattr(theirs, field.name), \
                f"{section.name}.{field.name} is not set by the file"
    assert cfg.lora.targets == ("q", "v", "gate")
    assert cfg.lora.alpha == 24.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.optim.clip_norm is None
    assert cfg.model.remat is True and cfg.data.pack is False

    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(again) == cfg
    assert to_toml(load_config(again)) == to_toml(cfg)
    assert to_toml(RunConfig()) != to_toml(cfg)
    with_validation = tmp_path / "validation.toml"
    with_validation.write_text('[data]\nvalidation = "a/dev.csv"\n', encoding="utf-8")
    cfg = load_config(with_validation)
    assert cfg.data.validation == "a/dev.csv" != default.data.validation
    again.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(again) == cfg


def test_overrides_of_tuples_bools_numbers_and_none(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = 7\npredict = true\n", encoding="utf-8")
    cfg = load_config(path, ["lora.targets=q,v", "train.predict=false", "lora.enabled=no",
                             "model.remat=true", "optim.clip_norm=none", "train.epochs=5",
                             "optim.learning_rate=3e-4", "data.prompt=a=b {comment}"])
    assert cfg.lora.targets == ("q", "v")
    assert cfg.train.predict is False and cfg.lora.enabled is False and cfg.model.remat is True
    assert cfg.optim.clip_norm is None
    assert cfg.train.epochs == 5  # the command line wins over the file
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.data.prompt == "a=b {comment}"  # only the first '=' splits
    assert load_config(None, ["lora.targets= o ,"]).lora.targets == ("o",)
    # written as in the TOML file, a list is read as one
    assert load_config(None, ['lora.targets=["q", "up"]']).lora.targets == ("q", "up")
    assert load_config(None, ["optim.clip_norm=0.5"]).optim.clip_norm == 0.5
    assert load_config(None, []) == RunConfig()


def test_a_task_of_its_own_uses_none_of_the_main_jobs_defaults(tmp_path):
    config = tmp_path / "my comp.toml"
    config.write_text('[task]\nkind = "generation"\nprompt = "{q}"\nanswer = "{a}"\n'
                      '[data]\ntrain = "train.csv"\n', encoding="utf-8")
    cfg = load_config(config)
    # Not runs/tarr-sentiment with the review files: its own name, no test file unless given.
    assert (cfg.output.name, cfg.data.task, cfg.data.test) == ("my-comp", "", "")
    assert load_config(None, ["task.kind=generation", "task.prompt={q}", "task.answer={a}",
                              "data.train=t.csv"]).output.name == "task"
    with pytest.raises(ConfigError, match="data.train is empty: a \\[task\\] of its own"):
        load_config(None, ["task.kind=generation", "task.prompt={q}", "task.answer={a}"])


# ----------------------------------------------------------------------------- 5. outputs


def test_outputs_of_a_run_with_and_without_prediction(ws, straight, capsys):
    # train.predict=false: trained and saved, nothing predicted.
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 6
    assert not {"validation", "submission", "report"} & set(summary)
    assert not (straight / "report").exists()
    assert not (ws.root / "submissions" / "straight").exists()
    assert (straight / "adapter").is_dir()

    records = _metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["tokens_per_s"] >= 0 and r["target_tokens"] > 0
    assert any(r["tokens_per_s"] > 0 for r in records)
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same, finished run started again with prediction on: no more steps, only outputs.
    run_dir = ws.run_dir("predicted")
    shutil.copytree(straight, run_dir)
    capsys.readouterr()
    assert train.main(ws.args("predicted", "train.max_steps=6")) == 0
    assert "resumed from step 6" in capsys.readouterr().out
    assert _metrics(run_dir) == records
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6

    validation = summary["validation"]
    assert validation["n"] == TRAIN_REVIEWS - 16
    confusion = np.array(validation["confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == validation["n"]
    assert validation["accuracy"] == pytest.approx(np.trace(confusion) / validation["n"])
    for key in ("raw_accuracy", "macro_f1", "calibrated_threshold", "auc",
                "accuracy_cross_fitted"):
        assert math.isfinite(validation[key])
    # The default decision is argmax: the validation accuracy is argmax's, the threshold 0.
    assert validation["decision"] == "argmax" and validation["threshold"] == 0.0
    assert validation["accuracy"] == validation["raw_accuracy"]

    submission = Path(summary["submission"])
    assert submission.parent == ws.root / "submissions" / "predicted"
    assert re.fullmatch(r"predicted-\d{8}-\d{6}\.tsv", submission.name)  # output.name
    assert summary["submissions"] == [str(submission)]
    sample, written = read_sample(ws.test), read_sample(submission)
    assert written.columns == ["id", "comment", "label"]
    assert written["id"].to_list() == sample["id"].to_list()
    assert written["comment"].to_list() == sample["comment"].to_list()
    assert set(written["label"].to_list()) <= {"0", "1"}

    report = Path(summary["report"])
    assert report == run_dir / "report" / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "accuracy" in text and "6 points from step 1 to 6" in text


def test_a_scanned_run_keeps_files_per_layer_and_predicts_as_it_validated(ws, capsys):
    """model.scan_layers: the layers train stacked, the adapter file keeps the per-layer
    layout, and `predict` (which stacks it again) writes the submission training wrote."""
    from kaggle_pipeline import predict
    from kaggle_pipeline.checkpoints.adapter import load_adapter

    args = ws.args("scanned", "model.scan_layers=true", "train.max_steps=2")
    assert train.main(args) == 0
    run_dir = ws.run_dir("scanned")
    adapter, _ = load_adapter(run_dir / "adapter")
    assert sorted(adapter) == [f"layer_{i}" for i in range(4)]  # tiny-gemma3: 4 layers
    trained = Path(json.loads((run_dir / "summary.json").read_text())["submission"])
    again = predict.predict(load_config(None, args))
    assert again != trained
    assert again.read_text(encoding="utf-8") == trained.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- 6. full FT


def test_full_fine_tuning_saves_the_model_and_guards_its_run_dir(ws, capsys):
    run_dir = ws.run_dir("full")
    args = ws.args("full", "train.predict=false", "train.max_steps=2")
    assert train.main([*args, "lora.enabled=false"]) == 0
    assert "full fine-tuning" in capsys.readouterr().out
    assert not (run_dir / "adapter").exists()

    # The saved model loads as a checkpoint and holds the trained params.
    section = load_config(None, args).model
    _, saved = run_setup.load_model(dataclasses.replace(section, checkpoint=str(run_dir / "model")))
    _, initial = run_setup.load_model(section)
    trained = _saved_state(run_dir)
    assert int(trained["step"]) == 2
    _assert_trees_equal(saved, trained["trainable"])
    assert not np.array_equal(saved["embedder"]["input_embedding"],
                              initial["embedder"]["input_embedding"])

    config_before = (run_dir / "config.toml").read_text()
    for change, keys in (("lora.enabled=true", "lora.enabled"),
                         ("optim.learning_rate=0.5", "optim.learning_rate"),
                         ("lora.rank=2", "lora.rank")):
        extra = [change] if change.startswith("lora.enabled") else ["lora.enabled=false", change]
        capsys.readouterr()
        assert train.main([*args, *extra]) == 2
        assert capsys.readouterr().err == (
            f"error: {run_dir} holds checkpoints trained from other inputs: the settings "
            f"{keys} changed. Train into another output.name, or delete {run_dir} to start "
            "over\n")
    assert (run_dir / "config.toml").read_text() == config_before
    assert _checkpoint_steps(run_dir) == [2]


# ----------------------------------------------------------------------------- 7. bad rows


def test_bad_training_rows_fail_from_the_cli_or_are_skipped(ws, capsys):
    lines = ws.train.read_text(encoding="utf-8").splitlines(keepends=True)
    # Header is line 1; the bad rows become lines 6 and 9 of the file.
    lines.insert(5, "900\t맛은 그냥 그래요\t2\n")
    lines.insert(8, "901\t\t1\n")
    bad = ws.root / "bad_train.tsv"
    bad.write_text("".join(lines), encoding="utf-8")
    args = [*ws.args("bad-rows", "train.predict=false", "train.max_steps=1"),
            f"data.train={bad}"]

    command, env = ws.cli()
    done = subprocess.run([*command, *args], cwd=ws.root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {bad}: line 6, field 'label': label 2 is not one of 1, 0\n"

    only_empty = ws.root / "empty_comment.tsv"
    only_empty.write_text("".join(lines[:5] + lines[6:]), encoding="utf-8")
    capsys.readouterr()
    assert train.main([*args, f"data.train={only_empty}"]) == 2
    assert capsys.readouterr().err == f"error: {only_empty}: line 8, field 'comment': empty text\n"

    # The same command with on_bad_row=skip, in the same run dir, trains on the good rows.
    assert train.main([*args, "data.on_bad_row=skip"]) == 0
    out = capsys.readouterr().out
    assert (f"read {TRAIN_REVIEWS} rows, skipped 2 of {TRAIN_REVIEWS + 2}:\n"
            f"  {bad}: line 6, field 'label': label 2 is not one of 1, 0\n"
            f"  {bad}: line 9, field 'comment': empty text\n") in out
    assert "16 training and 4 validation examples" in out
    assert [r["step"] for r in _metrics(ws.run_dir("bad-rows"))] == [1]


# ----------------------------------------------------------------------------- 8. hostile users
# Issue 12: each failure gets a one-line message and exit 2, before the model loads when no
# model is needed to tell, and leaves nothing stale or half-written.


def _no_model(monkeypatch):
    """Every check of these tests needs no model: loading one fails the test."""
    monkeypatch.setattr(run_setup, "load_model", lambda *a, **k: pytest.fail(
        "the model was loaded before the check"))


def _nothing_written(ws, name):
    assert not ws.run_dir(name).exists()
    assert not (ws.root / "submissions" / name).exists()


@pytest.mark.parametrize("setting, message", [
    ("train.epochs=0", "train.epochs = 0 is out of range: allowed 1 to 10,000"),
    ("data.seq_len=0", "data.seq_len = 0 is out of range: allowed 16 to 1,048,576"),
    ("data.batch_size=-2", "data.batch_size = -2 is out of range: allowed 1 to 65,536"),
    ("data.batch_size=0", "data.batch_size = 0 is out of range: allowed 1 to 65,536"),
    ("optim.learning_rate=-1", "optim.learning_rate = -1.0 is out of range: allowed 1e-09 to 1"),
    ("optim.learning_rate=1e6",
     "optim.learning_rate = 1000000.0 is out of range: allowed 1e-09 to 1"),
    ("optim.learning_rate=nan", "optim.learning_rate: expected a finite number, got 'nan'"),
    ("train.save_every=0", "train.save_every = 0 is out of range: allowed 1 to 1,099,511,627,776"),
    ("train.keep=0", "train.keep = 0 is out of range: allowed 1 to 1,000"),
    ("optim.accumulate_steps=0", "optim.accumulate_steps = 0 is out of range: allowed 1 to 65,536"),
    ("lora.rank=0", "lora.rank = 0 is out of range: allowed 1 to 4,096"),
    ("lora.last_layers=-1", "lora.last_layers = -1 is out of range: allowed 0 to 65,536"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got '1.5'"),
    ("optim.schedule=cosin", "optim.schedule = 'cosin': expected one of 'cosine', 'linear', "
                             "'constant'"),
    ("data.task=nsmc", "data.task = 'nsmc': expected one of 'tarr-sentiment', 'dolly-en-ko', "
                       "'aihub-dialogue', 'aihub-parallel', 'aihub-summarization', 'aihub-qa' "
                       "or \"\""),
    ("data.loss_on=all", "data.loss_on = 'all': expected one of 'answer', 'label'"),
    ("data.on_bad_row=ignore", "data.on_bad_row = 'ignore': expected one of 'error', 'skip'"),
    ("model.dtype=fp16", "model.dtype = 'fp16': expected one of 'auto', 'float32', "
                         "'bfloat16'"),
    ("model.remat_policy=some", "model.remat_policy = 'some': expected one of 'full', 'dots'"),
    ("model.attention_chunk=-1", "model.attention_chunk = -1 is out of range: allowed 0 to "
                                 "1,048,576"),
    ("data.max_prompt_len=3", "data.max_prompt_len = 3 is out of range: allowed 16 to "
                              "1,048,576"),
    ("train.mesh_data=0", "train.mesh_data = 0: use -1 (the devices left over) or a positive "
                          "count"),
    ("output.name=my run", "output.name = 'my run': the run's folder and submission name: "
                           "letters, digits, '-', '_' or '.', starting with a letter or digit"),
    ("train.mesh_fsdp=3", "train.mesh_data x mesh_fsdp x mesh_model = -1 x 3 x 1: 1 devices do "
                          "not split into fsdp=3 x model=1"),
    ("data.prompt=리뷰: {0}", "[task]: template '리뷰: {0}': placeholder {0} must be a column "
                            "name"),
    ("data.prompt=리뷰: {review}", "task.prompt of task 'tarr-sentiment' uses {review}, which "
                                 "is not a column; available columns: id, comment, label"),
    ("task.labels={\"1\"=\"좋음\"}", "{train}: line 5, field 'label': label 0 is not one of 1"),
    ("model.checkpoint=/nonexistent/gemma.gguf",
     "model.checkpoint: /nonexistent/gemma.gguf does not exist"),
    ("model.tokenizer=/nonexistent/tokenizer.model",
     "model.tokenizer: /nonexistent/tokenizer.model: tokenizer file not found"),
    ("model.checkpoint={root}/no_tokenizer", "no tokenizer.model in or next to "
     "{root}/no_tokenizer (model.checkpoint); set model.tokenizer to the model's "
     "tokenizer.model"),
    ("data.test=/nonexistent/test.tsv", "/nonexistent/test.tsv: no such file"),
])
def test_bad_settings_fail_in_one_line_before_the_model_loads(ws, monkeypatch, capsys, setting,
                                                               message):
    (ws.root / "no_tokenizer").mkdir(exist_ok=True)
    (ws.root / "no_tokenizer" / "config.json").write_text("{}")
    _no_model(monkeypatch)
    name = "bad-setting"
    setting = setting.replace("{root}", str(ws.root))
    assert train.main(ws.args(name, setting)) == 2
    captured = capsys.readouterr()
    message = message.replace("{root}", str(ws.root)).replace("{train}", str(ws.train))
    assert captured.err == f"error: {message}\n"
    _nothing_written(ws, name)


def test_test_file_problems_fail_before_training(ws, monkeypatch, capsys):
    lines = ws.test.read_text(encoding="utf-8").splitlines(keepends=True)
    bad = ws.root / "bad_test.tsv"
    bad.write_text("".join(lines[:2] + ["905\t\n"] + lines[2:]), encoding="utf-8")
    _no_model(monkeypatch)
    args = ws.args("bad-test", f"data.test={bad}")
    assert train.main(args) == 2
    assert capsys.readouterr().err == f"error: {bad}: line 3, field 'comment': empty text\n"
    # Skipping bad rows cannot apply to a test file: every row needs a prediction.
    assert train.main([*args, "data.on_bad_row=skip"]) == 2
    assert capsys.readouterr().err == (
        "error: 1 test rows cannot be read and every test row needs a prediction; fix the file. "
        f"The first: {bad}: line 3, field 'comment': empty text\n")
    # A sample submission whose ids are not the test file's.
    sample = ws.root / "sample.csv"
    sample.write_text("id,label\n" + "".join(f"{line.split(chr(9))[0]},0\n" for line in lines[1:])
                      + "999,0\n", encoding="utf-8")
    assert train.main([*ws.args("bad-test"), f"task.sample_submission={sample}"]) == 2
    assert capsys.readouterr().err == (f"error: {sample}: 1 ids are not rows of the test file "
                                       f"{ws.test}: '999'\n")
    _nothing_written(ws, "bad-test")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_training(
        ws, gemma3_tokenizer, monkeypatch, capsys):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from kaggle_pipeline.checkpoints import save_hf
    from kaggle_pipeline.data.tokenizer import Tokenizer
    from kaggle_pipeline.model import abstract_params
    from kaggle_pipeline.model.config import tiny_config

    # A model whose embedding has 1000 rows and the 262k-piece Gemma 3 tokenizer: every id
    # past 999 would index outside the embedding (a silent loss of 17 instead of 5).
    small = tiny_config("gemma3", vocab_size=1000)
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_params(small))
    checkpoint = save_hf(params, small, ws.root / "small_vocab", dtype=np.float32)
    gemma3_tokenizer.save(checkpoint / "tokenizer.model")
    name = "wrong-tokenizer"
    args = ws.args(name, f"model.checkpoint={checkpoint}", "model.preset=")
    assert train.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: Tokenizer(source='{checkpoint / 'tokenizer.model'}', vocab_size=262144) has "
        "262144 pieces but the model's embedding has 1000 rows: not this model's tokenizer; "
        "set model.tokenizer to the model's tokenizer.model\n")
    assert not (ws.run_dir(name) / "checkpoints").exists()
    assert not (ws.root / "submissions" / name).exists()

    # A SentencePiece model without Gemma's chat tokens: refused before any model loads.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(gemma3_tokenizer.serialized())
    proto.pieces[gemma3_tokenizer.start_of_turn_id].piece = "<turn_start>"
    no_chat = ws.root / "no_chat.model"
    Tokenizer(proto).save(no_chat)
    _no_model(monkeypatch)
    assert train.main(ws.args("no-chat", f"model.tokenizer={no_chat}")) == 2
    assert capsys.readouterr().err == (
        f"error: Tokenizer(source='{no_chat}', vocab_size=262144) has no start_of_turn token "
        f"({no_chat}: piece '<start_of_turn>' is not in the vocabulary); it is not a Gemma "
        "tokenizer: set model.tokenizer to the model's tokenizer.model\n")
    _nothing_written(ws, "no-chat")


def test_a_truncated_checkpoint_is_one_line(ws, gemma3_tokenizer, capsys):
    from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

    truncated = ws.root / "truncated.gguf"
    with open(gemma3_270m_gguf(), "rb") as f:
        truncated.write_bytes(f.read(2_000_000))  # a download stopped at 2 MB
    tokenizer = ws.root / "gemma3_tokenizer.model"
    gemma3_tokenizer.save(tokenizer)
    name = "truncated"
    assert train.main(ws.args(name, f"model.checkpoint={truncated}", "model.preset=",
                              f"model.tokenizer={tokenizer}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {truncated}: not a readable GGUF file (")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (ws.run_dir(name) / "checkpoints").exists()


def test_training_data_edited_in_place_does_not_resume_the_stale_model(ws, capsys):
    folder = ws.root / "edited"
    folder.mkdir()
    data = folder / "train.tsv"
    shutil.copyfile(ws.train, data)
    name = "edited"
    args = [*ws.args(name, "train.max_steps=2", "train.predict=false"), f"data.train={data}"]
    assert train.main(args) == 0
    run_dir = ws.run_dir(name)
    # Neither another test file nor the same train file elsewhere is another run.
    other_test = folder / "test.tsv"
    other_test.write_text("".join(ws.test.read_text().splitlines(keepends=True)[:3]))
    moved = folder / "moved.tsv"
    shutil.copyfile(data, moved)
    capsys.readouterr()
    assert train.main([*args, f"data.test={other_test}", f"data.train={moved}"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out

    # Every label flipped in place: the checkpoints are of another run.
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    flipped = [lines[0]] + [line[:-2] + ("0" if line[-2] == "1" else "1") + "\n"
                            for line in lines[1:]]
    data.write_text("".join(flipped), encoding="utf-8")
    assert train.main([*args, "train.predict=true"]) == 2
    assert capsys.readouterr().err == (
        f"error: {run_dir} holds checkpoints trained from other inputs: the training data "
        f"({data}) changed. Train into another output.name, or delete {run_dir} to start over\n")
    assert _checkpoint_steps(run_dir) == [2]
    assert not (ws.root / "submissions" / name).exists()  # no submission from the stale model


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(ws, straight, capsys):
    name = "corrupt"
    run_dir = ws.run_dir(name)
    args = ws.args(name, "train.predict=false", "train.save_every=1", "train.keep=3")
    assert train.main([*args, "train.max_steps=4"]) == 0
    assert _checkpoint_steps(run_dir) == [2, 3, 4]
    # The array data of step 4 cut in half (a disk that filled up, a copy that stopped).
    for file in (run_dir / "checkpoints" / "4").rglob("*"):
        if file.is_file() and "/d/" in str(file) and file.stat().st_size > 10_000:
            file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    capsys.readouterr()
    assert train.main([*args, "train.max_steps=6"]) == 0
    captured = capsys.readouterr()
    damaged = run_dir / "checkpoints" / "damaged-4"
    assert re.search(rf"warning: checkpoint step 4 cannot be read \(.*\); moved it to "
                     rf"{re.escape(str(damaged))}, trying the one before\n", captured.out)
    assert "resumed from step 3" in captured.out and "Traceback" not in captured.err
    assert damaged.is_dir() and _checkpoint_steps(run_dir) == [4, 5, 6]
    # Steps 4-6 taken again from step 3 are those of an unbroken run.
    assert [r["loss"] for r in _metrics(run_dir)] == [r["loss"] for r in _metrics(straight)]


def test_predict_after_a_run_without_summary_recomputes_the_threshold(ws, capsys):
    from kaggle_pipeline import predict

    name = "no-summary"
    args = ws.args(name, "train.max_steps=2", "task.decision=threshold")
    assert train.main(args) == 0
    run_dir = ws.run_dir(name)
    summary = json.loads((run_dir / "summary.json").read_text())
    threshold = summary["validation"]["threshold"]
    calibrated = Path(summary["submission"])
    # The run stopped before it validated: no summary.json.
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    assert predict.main(args) == 0
    out = capsys.readouterr().out
    assert "has no calibrated threshold (the run stopped before validating): recomputing" in out
    assert f"recomputed the threshold from 4 validation examples: {threshold:+.3f}" in out
    written = Path(json.loads((run_dir / "summary.json").read_text())["submission"])
    assert written != calibrated and written.read_bytes() == calibrated.read_bytes()
    # With the default argmax decision there is nothing to recompute.
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    assert predict.main(ws.args(name, "train.max_steps=2")) == 0
    assert "recomput" not in capsys.readouterr().out


def test_ctrl_c_before_the_loop_exits_130_without_a_traceback(ws, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. while the model loads

    monkeypatch.setattr(run_setup, "load_model", interrupted)
    assert train.main(ws.args("ctrl-c")) == 130
    assert capsys.readouterr().err == "\ninterrupted (Ctrl-C)\n"
    assert not (ws.run_dir("ctrl-c") / "checkpoints").exists()


def test_commands_keep_compiled_programs_unless_the_user_chose_a_cache(tmp_path, monkeypatch):
    from kaggle_pipeline import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", "/chosen/by/the/user")
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == "/chosen/by/the/user"
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_enable_compilation_cache", False)  # turned off: left off
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
        jax.config.update("jax_enable_compilation_cache", True)
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "kaggle_pipeline" / "jax")
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", saved)
