"""Kaggle kernel: LoRA fine-tune Gemma with kaggle_pipeline, predict, write the submission.

Kaggle uploads only this file when a kernel is pushed, so `python -m kaggle_pipeline.kernels
build` embeds the package source (a base64 zip) and the task's config.toml into it. The kernel
runs with the internet off and downloads nothing. Wheels for packages missing from the Kaggle
image can be attached as a dataset whose folder is named `kaggle-pipeline-wheels`; they are
installed with `pip install --no-index --no-deps`.

Paths come from the environment, so the kernel also runs locally on copies of its inputs:
  KAGGLE_INPUT_ROOT   where datasets and models are mounted (default /kaggle/input)
  KAGGLE_WORKING_DIR  where outputs are written (default /kaggle/working)
"""

from __future__ import annotations

import base64
import io
import json
import os
import string
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

# ---- task settings: the only part that differs between kernels/<task>/kernel.py
TASK = "template"
SUBMISSION_FILE = "submission.csv"
# Found by glob under KAGGLE_INPUT_ROOT, so the exact mount layout does not matter
# (models mount as <model>/<framework>/<variation>/<version>).
INPUTS = {
    "train_file": "**/your-dataset/train.csv",
    "test_file": "**/your-dataset/test.csv",
    "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*",
}

# ---- runner: identical in every kernel (tests/test_kernels.py checks it)
PACKAGE_ZIP_B64 = None  # set by `python -m kaggle_pipeline.kernels build`
CONFIG_TOML = None  # set by the build from config.toml
WHEELS_GLOB = "**/kaggle-pipeline-wheels/*.whl"


def _here() -> Path | None:
    file = globals().get("__file__")  # undefined when the code runs as a notebook cell
    return Path(file).resolve().parent if file else None


def package_root() -> Path:
    """The folder holding kaggle_pipeline/: the embedded bundle, else the copy beside this file."""
    if PACKAGE_ZIP_B64:
        root = Path(tempfile.mkdtemp(prefix="kaggle_pipeline_src_"))  # not in the kernel output
        with zipfile.ZipFile(io.BytesIO(base64.b64decode(PACKAGE_ZIP_B64))) as bundle:
            bundle.extractall(root)
        return root
    here = _here()
    if here and (here / "kaggle_pipeline" / "__init__.py").is_file():
        return here
    raise SystemExit(f"{TASK}: kaggle_pipeline is not bundled: build the kernel with "
                     "`python -m kaggle_pipeline.kernels build` first")


def config_template() -> str:
    if CONFIG_TOML is not None:
        return CONFIG_TOML
    here = _here()
    if here and (here / "config.toml").is_file():
        return (here / "config.toml").read_text(encoding="utf-8")
    raise SystemExit(f"{TASK}: no config.toml: build the kernel first")


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


def run(step: str, command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, **kwargs).returncode
    if code != 0:
        raise SystemExit(f"{TASK}: {step} failed with exit code {code}")


def main() -> None:
    input_root = Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))
    working_dir = Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))
    working_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(input_root.glob(WHEELS_GLOB))
    if wheels:
        run("pip install", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            *map(str, wheels)])
    values = {"input_root": input_root, "working_dir": working_dir, **find_inputs(input_root)}
    config = working_dir / f"{TASK}.toml"
    config.write_text(render_config(config_template(), values), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), env.get("PYTHONPATH"))
                                        if p)
    for step in ("train", "predict"):
        run(step, [sys.executable, "-m", f"kaggle_pipeline.{step}", "--config", str(config)],
            env=env, cwd=working_dir)
    submission = working_dir / SUBMISSION_FILE
    if not submission.is_file():
        raise SystemExit(f"{TASK}: predict finished but {submission} does not exist")
    print(f"{TASK}: wrote {submission}")


if __name__ == "__main__":
    main()
