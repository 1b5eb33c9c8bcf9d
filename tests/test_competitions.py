"""Two made-up competitions defined only in a TOML file's [task] section, run only from the command
line (`python -m kaggle_pipeline.<command> --config ...`) on a tiny Gemma 3 with the real
tokenizer: a 3-class classification CSV whose sample submission has its own id order, ids that
are not 1..N and an extra column, and a Korean<->English translation JSON lines file. Train,
predict and evaluate must work without a line of Python, the submission must match the sample
exactly, and every file written must be readable by all (0644, folders 0755).

Every subprocess shares one persistent compilation cache, so the step compiles once.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from kaggle_pipeline.checkpoints import save_hf
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.run_config import ConfigError, RunConfig, load_config
from kaggle_pipeline.submission import read_sample

ANIMALS = {"cat": ["고양이가 창가에서 졸아요", "야옹 하고 울어요", "cats purr softly"],
           "dog": ["강아지가 꼬리를 흔들어요", "산책 가자고 짖어요", "dogs fetch sticks"],
           "bird": ["새가 아침에 노래해요", "하늘 높이 날아요", "birds build nests"]}
PAIRS = [("안녕하세요", "Hello"), ("감사합니다", "Thank you"), ("사랑해요", "I love you"),
         ("배고파요", "I am hungry"), ("좋은 아침이에요", "Good morning"),
         ("잘 자요", "Good night")]


def _cli(module: str, *args: str, cwd: Path, cache: Path, timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    return subprocess.run([sys.executable, "-m", f"kaggle_pipeline.{module}", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gemma3_tokenizer) -> Path:
    """A folder as a competitor has it: a tiny Hugging Face checkpoint with its tokenizer."""
    root = tmp_path_factory.mktemp("competitions")
    config = tiny_config("gemma3", vocab_size=262_144)
    rng = np.random.default_rng(0)
    params = {k: v for k, v in abstract_params(config).items()}
    import jax

    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                          params)
    save_hf(params, config, root / "model", dtype=jnp.float32)
    gemma3_tokenizer.save(root / "model" / "tokenizer.model")
    (root / "jax_cache").mkdir()
    return root


def _animals(folder: Path) -> dict:
    """train.csv (id, text, source, animal), test.csv (id, text, source) and a sample submission
    (id, animal, Usage) listing the test ids in another order."""
    folder.mkdir()
    rng = random.Random(0)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "source", "animal"])
        for i in range(30):
            animal = list(ANIMALS)[i % 3]
            writer.writerow([f"a-{1000 + 7 * i}", f"{rng.choice(ANIMALS[animal])} ({i})", "web",
                             animal])
    test_ids = [f"t{97 - 5 * i:03d}" for i in range(6)]
    with open(folder / "test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "source"])
        for i, key in enumerate(test_ids):
            writer.writerow([key, rng.choice(sum(ANIMALS.values(), [])) + f", {i}", "app"])
    sample_ids = [test_ids[i] for i in (3, 0, 5, 1, 4, 2)]
    with open(folder / "sample_submission.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "animal", "Usage"])
        for key in sample_ids:
            writer.writerow([key, "cat", "Private" if key < "t085" else "Public"])
    return {"sample_ids": sample_ids}


ANIMALS_TOML = """
[task]
kind = "classification"
prompt = "Text: {text}\\nWhich animal is it about?"
system = "Answer with one word."
label_column = "animal"
labels = { cat = "cat", dog = "dog", bird = "bird" }
metric = "macro_f1"
sample_submission = "sample_submission.csv"

[model]
checkpoint = "../model"

[data]
train = "train.csv"
test = "test.csv"
validation_fraction = 0.2
seq_len = 128
batch_size = 2

[train]
epochs = 1
max_steps = 2

[output]
name = "animals"
"""


def _modes(root: Path) -> list[str]:
    """Files not 0644 and folders not 0755 (less the umask) under `root`."""
    umask = os.umask(0)
    os.umask(umask)
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o755 if path.is_dir() else 0o644) & ~umask
        if mode != want:
            wrong.append(f"{path}: {oct(mode)}")
    return wrong


def test_a_classification_competition_from_a_toml_file_only(workspace):
    folder = workspace / "animals"
    files = _animals(folder)
    (folder / "comp.toml").write_text(ANIMALS_TOML, encoding="utf-8")
    cache = workspace / "jax_cache"

    out = _ok(_cli("train", "--config", "comp.toml", cwd=folder, cache=cache))
    assert "24 training and 6 validation examples" in out
    # stdout is no terminal: one log line per tenth of the steps, no redrawn progress bar.
    assert "\r" not in out and out.count("train: 1/2 step") == out.count("train: 2/2 step") == 1
    assert "6 test rows to predict after training" in out
    assert re.search(r"validation macro_f1 \d\.\d{3}, accuracy \d\.\d{3}, macro-F1", out)
    run = folder / "runs" / "animals"
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    (written,) = (folder / "submissions").iterdir()
    assert re.fullmatch(r"animals-\d{8}-\d{6}\.csv", written.name)  # the run's name
    assert summary["submission"] == str(Path("submissions") / written.name)
    assert summary["validation"]["metric"] == "macro_f1"
    assert summary["validation"]["score"] == summary["validation"]["macro_f1"]
    assert np.array(summary["validation"]["confusion"]).shape == (3, 3)

    # The submission is the sample: its columns, its id order, its other columns verbatim.
    sample, submission = read_sample(folder / "sample_submission.csv"), read_sample(written)
    assert submission.columns == ["id", "animal", "Usage"]
    assert submission["id"].to_list() == files["sample_ids"]
    assert submission["Usage"].to_list() == sample["Usage"].to_list()
    assert set(submission["animal"].to_list()) <= set(ANIMALS)
    lines = written.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,animal,Usage" and len(lines) == 7

    # runs/<name>/config.toml reproduces the run: it loads to the same settings.
    assert load_config(run / "config.toml") == load_config(folder / "comp.toml")

    # predict and evaluate from the same file, nothing else.
    out = _ok(_cli("predict", "--config", "comp.toml", cwd=folder, cache=cache))
    assert "recomputing" not in out  # the calibrated decision of the run is reused
    recorded = json.loads((run / "summary.json").read_text())["submissions"]
    assert len(recorded) == 2 and recorded[0] == str(Path("submissions") / written.name)
    second = folder / recorded[1]
    assert second != written and read_sample(second).equals(submission)
    out = _ok(_cli("evaluate", "--config", "comp.toml", cwd=folder, cache=cache))
    report = (run / "evaluation" / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# animals: validation, 6 examples")
    assert "| macro_f1 (task.metric) |" in report
    assert "true \\ predicted | cat | dog | bird" in report

    assert _modes(run) == [] and _modes(folder / "submissions") == []


def _translations(folder: Path) -> None:
    """train.jsonl / test.jsonl: {"uid": number, "to": "English"|"Korean", "source", "target"},
    both directions mixed."""
    folder.mkdir()
    rng = random.Random(1)
    for name, count, start in (("train.jsonl", 20, 500), ("test.jsonl", 4, 900)):
        with open(folder / name, "w", encoding="utf-8") as f:
            for i in range(count):
                ko, en = rng.choice(PAIRS)
                row = {"uid": start + i, "to": "English", "source": ko, "target": en} if i % 2 \
                    else {"uid": start + i, "to": "Korean", "source": en, "target": ko}
                if name == "test.jsonl":
                    del row["target"]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


TRANSLATION_TOML = """
[task]
kind = "generation"
id_column = "uid"
prompt = "Translate into {to}:\\n{source}"
answer = "{target}"
max_new_tokens = 6
metric = "chrf"
validation_size = 3
submission_columns = ["uid", "target"]

[model]
checkpoint = "../model"

[data]
train = "train.jsonl"
test = "test.jsonl"
validation_fraction = 0.2
seq_len = 128
batch_size = 2
loss_on = "answer"

[train]
epochs = 1
max_steps = 2

[output]
name = "ko-en"
"""


def test_a_translation_competition_both_ways_from_a_toml_file_only(workspace):
    folder = workspace / "translation"
    _translations(folder)
    (folder / "comp.toml").write_text(TRANSLATION_TOML, encoding="utf-8")
    cache = workspace / "jax_cache"

    out = _ok(_cli("train", "--config", "comp.toml", cwd=folder, cache=cache))
    assert "validating on the first 3 of 4 validation examples (task.validation_size)" in out
    run = folder / "runs" / "ko-en"
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["validation"]["metric"] == "chrf" and summary["validation"]["n"] == 3
    (written,) = (folder / "submissions").iterdir()
    submission = read_sample(written)
    assert submission.columns == ["uid", "target"]
    assert submission["uid"].to_list() == ["900", "901", "902", "903"]  # JSON numbers, as text
    assert all(text.strip() for text in submission["target"].to_list())

    # evaluate the run's validation answers, then the file the run wrote against references.
    validation = run / "validation_predictions.csv"
    _ok(_cli("evaluate", "--config", "comp.toml", "--predictions", str(validation), cwd=folder,
             cache=cache))
    report = (run / "validation_predictions-report" / "report.md").read_text()
    assert "| chrf |" in report and "confusion" not in report.lower()
    assert _modes(run) == [] and _modes(folder / "submissions") == []


def test_kernels_build_from_a_competition_config(tmp_path, monkeypatch, capsys):
    from kaggle_pipeline import kernels

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "animals"
    _animals(folder)
    (folder / "comp.toml").write_text(ANIMALS_TOML, encoding="utf-8")
    monkeypatch.chdir(folder)
    out = tmp_path / "build" / "animals"
    # The TPU splits each batch 8 ways: the command line sets what the kernel needs.
    args = ["build", "animals-gemma", "--config", "comp.toml", "--out", str(out),
            "--username", "alice", "--competition", "animal-texts"]
    assert kernels.main(args) == 2
    assert capsys.readouterr().err == ("error: comp.toml (in the kernel): data.batch_size = 2 "
                                       "does not split over the 8 batch shards of the mesh\n")
    assert not out.exists()
    assert kernels.main([*args, "data.batch_size=8"]) == 0
    meta = json.loads((out / "kernel-metadata.json").read_text())
    assert meta["id"] == "alice/animals-gemma" and meta["title"] == "Animals Gemma"
    assert meta["competition_sources"] == ["animal-texts"] and meta["dataset_sources"] == []
    kernels.validate_metadata(meta, out)
    code = (out / "kernel.py").read_text()
    assert "'train_file': '**/animal-texts/train.csv'" in code
    assert "'sample_file': '**/animal-texts/sample_submission.csv'" in code
    assert "SUBMISSION_FILE = 'submission.csv'" in code
    kernel_config = (out / "config.toml").read_text()
    assert 'train = "${train_file}"' in kernel_config
    assert 'sample_submission = "${sample_file}"' in kernel_config
    assert 'labels = { "cat" = "cat", "dog" = "dog", "bird" = "bird" }' in kernel_config
    assert 'checkpoint = "${model_dir}"' in kernel_config  # the template's model mount


def test_the_shipped_configs_load_and_the_main_job_is_the_default():
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert [p.name for p in configs] == ["emoji-ko-en.toml", "kaggle-tpu-gemma2-2b.toml",
                                         "tarr-sentiment.toml"]
    assert load_config(REPO / "configs" / "tarr-sentiment.toml") == RunConfig()
    from kaggle_pipeline import run_setup

    emoji = load_config(REPO / "configs" / "emoji-ko-en.toml")
    spec = run_setup.task_spec(emoji)
    assert (spec.kind, spec.reader, spec.target_lang) == ("generation", "table", "en")
    # ../shared sits beside the checkout (here and in CI); the files are found from it.
    for value in (emoji.data.train, emoji.data.test):
        assert run_setup.input_paths(spec, value).is_file(), value
    tpu = load_config(REPO / "configs" / "kaggle-tpu-gemma2-2b.toml")
    assert (tpu.train.mesh_fsdp, tpu.model.dtype, tpu.model.scan_layers,
            tpu.data.batch_size % 8) == (8, "auto", True, 0)


@pytest.mark.parametrize("overrides, message", [
    (["data.task=aihub-parallel"], "'aihub-parallel' is generation"),
    (['task.labels={"0" = "나쁨", "1" = "보통", "2" = "좋음"}'],
     "'tarr-sentiment' is classification with 3 labels"),
])
def test_a_threshold_decision_needs_two_labels(overrides, message):
    from kaggle_pipeline import run_setup

    cfg = load_config(None, ["task.decision=threshold", *overrides])
    with pytest.raises(ConfigError, match=re.escape(
            f'task.decision = "threshold" needs a task with two labels; {message} (use '
            '"argmax" or leave it unset)')):
        run_setup.task_spec(cfg)
    assert run_setup.task_spec(load_config(None, overrides))  # argmax: fine
