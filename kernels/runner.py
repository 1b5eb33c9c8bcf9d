"""Kaggle kernel: LoRA fine-tune Gemma with kaggle_pipeline and write the submission.

Every kernel runs this code (kernels/runner.py). Kaggle uploads only the code file when a kernel
is pushed, so `python -m kaggle_pipeline.kernels build <task>` writes this file out with the
task's settings (kernels/<task>/kernel.py), its config.toml and the package source (a base64 zip)
filled in below. The kernel runs with the internet off and downloads nothing. Wheels for packages
missing from the Kaggle image can be attached as a dataset whose folder is named
`kaggle-pipeline-wheels`; they are installed with `pip install --no-index --no-deps`.

What it does: find the inputs (INPUTS below) under the input root, fill their paths into the
config, run `python -m kaggle_pipeline.train --config <working>/<task>.toml` (which trains,
validates, predicts the test file and writes a submission under output.submissions), then copy
the submission that run wrote to `<working>/SUBMISSION_FILE`.

Paths come from the environment, so the kernel also runs locally on copies of its inputs:
  KAGGLE_INPUT_ROOT          where datasets and models are mounted (default /kaggle/input)
  KAGGLE_WORKING_DIR         where outputs are written (default /kaggle/working)
  KAGGLE_PIPELINE_OVERRIDES  extra `section.key=value` settings for train, space-separated
                             (e.g. "train.max_steps=2" for a smoke run)
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

# ---- set by the build
TASK = None  # the kernel's folder name under kernels/
SUBMISSION_FILE = None  # from kernels/<task>/kernel.py
# From kernels/<task>/kernel.py: config placeholder -> glob under KAGGLE_INPUT_ROOT, so the exact
# mount layout does not matter (models mount as <model>/<framework>/<variation>/<version>).
INPUTS = None
CONFIG_TOML = None  # kernels/<task>/config.toml
PACKAGE_ZIP_B64 = None  # kaggle_pipeline/*.py

WHEELS_GLOB = "**/kaggle-pipeline-wheels/*.whl"
OVERRIDES_ENV = "KAGGLE_PIPELINE_OVERRIDES"


def package_root() -> Path:
    """A folder holding the bundled kaggle_pipeline/, outside the kernel's output."""
    root = Path(tempfile.mkdtemp(prefix="kaggle_pipeline_src_"))
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(PACKAGE_ZIP_B64))) as bundle:
        bundle.extractall(root)
    return root


def find_inputs(input_root: Path) -> dict[str, Path]:
    found = {}
    for name, pattern in INPUTS.items():
        matches = sorted(input_root.glob(pattern))
        if len(matches) != 1:
            listed = ", ".join(str(m) for m in matches[:5]) or "none"
            raise SystemExit(f"{TASK}: input {name!r}: expected one match of {pattern!r} under "
                             f"{input_root}, found {len(matches)} ({listed}); attach the "
                             "sources listed in kernel-metadata.json")
        found[name] = matches[0]
    return found


def render_config(template: str, values: dict[str, Path]) -> str:
    # json.dumps escapes quotes and backslashes the way TOML basic strings expect.
    escaped = {name: json.dumps(str(value))[1:-1] for name, value in values.items()}
    try:
        text = string.Template(template).substitute(escaped)
    except (KeyError, ValueError) as err:
        raise SystemExit(f"{TASK}: config.toml: bad placeholder {err}; known: "
                         f"{', '.join(sorted(values))}") from None
    try:
        tomllib.loads(text)  # a broken config fails here, not deep inside train
    except tomllib.TOMLDecodeError as err:
        raise SystemExit(f"{TASK}: config.toml: {err}") from None
    return text


def submissions_dir(config_text: str, overrides: list[str], working_dir: Path) -> Path:
    """output.submissions of the run (an override wins), relative to the working dir."""
    value = tomllib.loads(config_text).get("output", {}).get("submissions", "submissions")
    for item in overrides:
        key, _, text = item.partition("=")
        if key == "output.submissions":
            value = text
    return working_dir / Path(value).expanduser()


def newest_submission(folder: Path, since: float) -> Path:
    """The submission the run just wrote: the newest file there, not older than `since`."""
    wanted = Path(SUBMISSION_FILE).suffix
    written = [p for p in folder.glob("*") if p.suffix in (".csv", ".tsv")
               and p.stat().st_mtime >= since] if folder.is_dir() else []
    if not written:
        raise SystemExit(f"{TASK}: train finished but wrote no submission in {folder} (is "
                         "data.test set and train.predict true?)")
    newest = max(written, key=lambda p: p.stat().st_mtime)
    if newest.suffix != wanted:
        raise SystemExit(f"{TASK}: the run wrote {newest.name}, but this competition takes a "
                         f"{wanted} file ({SUBMISSION_FILE})")
    return newest


def copy_atomically(source: Path, target: Path) -> None:
    temp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temp)
    os.replace(temp, target)


def run(step: str, command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, **kwargs).returncode
    if code != 0:
        raise SystemExit(f"{TASK}: {step} failed with exit code {code}")


def main() -> None:
    if TASK is None:
        raise SystemExit("kernels/runner.py is no kernel by itself: build one with "
                         "`python -m kaggle_pipeline.kernels build <task> --out <dir>`")
    input_root = Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))
    working_dir = Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))
    working_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(input_root.glob(WHEELS_GLOB))
    if wheels:
        run("pip install", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            *map(str, wheels)])
    values = {"input_root": input_root, "working_dir": working_dir, **find_inputs(input_root)}
    text = render_config(CONFIG_TOML, values)
    config = working_dir / f"{TASK}.toml"
    config.write_text(text, encoding="utf-8")
    overrides = shlex.split(os.environ.get(OVERRIDES_ENV, ""))
    root = package_root()
    print(f"{TASK}: package: {root}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    started = time.time() - 1.0  # file times may be a little coarser than the clock
    run("train", [sys.executable, "-m", "kaggle_pipeline.train", "--config", str(config),
                  *overrides], env=env, cwd=working_dir)
    written = newest_submission(submissions_dir(text, overrides, working_dir), started)
    target = working_dir / SUBMISSION_FILE
    copy_atomically(written, target)
    print(f"{TASK}: copied {written} to {target}")


if __name__ == "__main__":
    main()
