"""End-to-end runs of `python -m kaggle_pipeline.train` on a tiny random Gemma 3 (the real 262k
vocabulary and tokenizer) and a slice of the real tarr data: exact resumption, SIGTERM,
non-finite loss, config errors, outputs, full fine-tuning, bad training rows.

Every LoRA run shares one config (shapes, optimizer, epochs), so the step compiles once; a
persistent compilation cache shared with the subprocess runs keeps the file fast.
"""

import dataclasses
import functools
import json
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


# ----------------------------------------------------------------------------- 2. SIGTERM


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(ws, straight, capsys):
    args = ws.args("sigterm", "train.predict=false")
    run_dir = ws.run_dir("sigterm")
    command, env = ws.cli()
    with open(ws.root / "sigterm.out", "w") as out, open(ws.root / "sigterm.err", "w") as err:
        proc = subprocess.Popen([*command, *args], cwd=ws.root, env=env, stdout=out, stderr=err)
        try:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.time() + 180
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                assert proc.poll() is None, (ws.root / "sigterm.err").read_text()
                assert time.time() < deadline, "no step finished in 180 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (ws.root / "sigterm.err").read_text()
    assert returncode == 0, stderr
    found = re.search(r"stopped by signal at step (\d+); checkpoint saved in (\S+)\. "
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
                       "'model', 'optim', 'output', 'train']"),
    (["train.nosuch=1"], "config section [train]: unknown key(s) ['nosuch']; known: ['epochs', "
                         "'keep', 'max_steps', 'mesh_data', 'mesh_fsdp', 'mesh_model', "
                         "'predict', 'save_every', 'seed']"),
    (["train.epochs"], "override 'train.epochs': expected section.key=value"),
    (["epochs=3"], "override 'epochs=3': expected section.key=value"),
    (["train.epochs=three"], "train.epochs: expected an integer, got 'three'"),
    (["optim.learning_rate=fast"], "optim.learning_rate: expected a number, got 'fast'"),
    (["train.predict=maybe"], "train.predict: expected true or false, got 'maybe'"),
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
task = "dolly-en-ko"
prompt = "Review: {comment}"
train = "a/train.csv"
test = "a/test.csv"
validation_fraction = 0.125
seq_len = 512
batch_size = 16
loss_on = "answer"
on_bad_row = "skip"
pack = false

[lora]
enabled = false
rank = 4
alpha = 32
dropout = 0.05
targets = ["q", "v", "gate"]

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
    for section in dataclasses.fields(RunConfig):
        ours, theirs = getattr(cfg, section.name), getattr(default, section.name)
        for field in dataclasses.fields(ours):
            assert getattr(ours, field.name) != getattr(theirs, field.name), \
                f"{section.name}.{field.name} is not set by the file"
    assert cfg.lora.targets == ("q", "v", "gate")
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.optim.clip_norm is None
    assert cfg.model.remat is True and cfg.data.pack is False

    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(again) == cfg
    assert to_toml(load_config(again)) == to_toml(cfg)
    assert to_toml(RunConfig()) != to_toml(cfg)


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
    assert load_config(None, ["optim.clip_norm=0.5"]).optim.clip_norm == 0.5
    assert load_config(None, []) == RunConfig()


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
    for key in ("raw_accuracy", "macro_f1", "threshold", "auc", "accuracy_cross_fitted"):
        assert math.isfinite(validation[key])

    submission = Path(summary["submission"])
    assert submission.parent == ws.root / "submissions" / "predicted"
    assert re.fullmatch(r"tarr-sentiment-\d{8}-\d{6}\.tsv", submission.name)
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
    for change, section_name in (("lora.enabled=true", "lora"),
                                 ("optim.learning_rate=0.5", "optim"),
                                 ("lora.rank=2", "lora")):
        extra = [change] if change.startswith("lora.enabled") else ["lora.enabled=false", change]
        with pytest.raises(SystemExit) as stopped:
            train.main([*args, *extra])
        assert str(stopped.value) == (
            f"error: {run_dir} holds a run with different [{section_name}] settings; use "
            f"another output.name or delete {run_dir} to start over")
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
