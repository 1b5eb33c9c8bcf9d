"""Kaggle kernels: metadata the kaggle CLI accepts, builds without secrets, push checks, and a
simulated kernel run. No test touches the network: sockets refuse to connect."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import string
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from kaggle_pipeline import kernels
from kaggle_pipeline.kernels import KernelError, build, validate_metadata

TASKS = ["aihub-dialogue", "dolly-en-ko", "tarr-sentiment", "template"]
# Another model for a task above (tests/test_plan.py checks its build).
VARIANTS = ["tarr-sentiment-9b"]
SECRETS = {
    "key": "kagglekey-SECRET-0123456789abcdef",
    "token": "KGAT_SECRET_fedcba9876543210",
    "file_token": "KGAT_FILE_SECRET_00112233445566",
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network call attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """A HOME with no Kaggle credentials and no KAGGLE_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def secret_home(clean_home, monkeypatch):
    """Fake credentials everywhere the kaggle CLI looks."""
    kaggle_dir = clean_home / ".kaggle"
    kaggle_dir.mkdir()
    (kaggle_dir / "kaggle.json").write_text(
        json.dumps({"username": "alice", "key": SECRETS["key"]}), encoding="utf-8")
    (kaggle_dir / "access_token").write_text(SECRETS["file_token"] + "\n", encoding="utf-8")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["key"])
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRETS["token"])
    return clean_home


@pytest.fixture
def kaggle_api(clean_home, monkeypatch):
    """The installed kaggle CLI's API object, with a fake client that records the push."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.config_values = {"username": "alice"}
    pushed = []

    class FakeClient:
        def __enter__(self):
            save = lambda request: pushed.append(request) or "ok"  # noqa: E731
            kernels_api = type("K", (), {"kernels_api_client": type("C", (), {
                "save_kernel": staticmethod(save)})})
            return type("Client", (), {"kernels": kernels_api})

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(api, "build_kaggle_client", FakeClient)
    api.pushed = pushed
    return api


# ---------------------------------------------------------------- metadata


def test_kernel_folders_are_the_expected_ones():
    assert kernels.available_tasks() == sorted(TASKS + VARIANTS)


def test_required_fields_are_the_kaggle_cli_template_fields(kaggle_api, tmp_path):
    # `kaggle kernels init` writes the fields the CLI reads; we require all but machine_shape.
    template = json.loads(Path(kaggle_api.kernels_initialize(str(tmp_path))).read_text())
    assert set(kernels.REQUIRED_FIELDS) == set(template) - {"machine_shape"}
    assert kernels.VALID_LANGUAGES == tuple(kaggle_api.valid_push_language_types)
    assert kernels.VALID_KERNEL_TYPES == tuple(kaggle_api.valid_push_kernel_types)
    assert kernels.VALID_PINNING_TYPES == tuple(kaggle_api.valid_push_pinning_types)


@pytest.mark.parametrize("task", TASKS)
def test_metadata_passes_our_and_the_kaggle_cli_validation(task, kaggle_api, tmp_path):
    from slugify import slugify

    source = REPO / "kernels" / task
    meta = json.loads((source / "kernel-metadata.json").read_text(encoding="utf-8"))
    validate_metadata(meta, source)
    assert meta["id"].startswith(kernels.PLACEHOLDER_USERNAME + "/")
    assert slugify(meta["title"]) == meta["id"].split("/")[1]  # else the CLI warns
    assert meta["language"] == "python" and meta["kernel_type"] == "script"
    assert meta["is_private"] is True and meta["enable_internet"] is False
    assert meta["enable_tpu"] is True and meta["enable_gpu"] is False  # Gemma 2 runs on TPU
    assert meta["model_sources"] == ["google/gemma-2/flax/gemma2-2b-it/1"]

    out = build(task, tmp_path / "built", username="alice")
    kaggle_api.kernels_push(str(out))  # the real CLI's validation, then our fake client
    (request,) = kaggle_api.pushed
    assert request.slug == f"alice/{meta['id'].split('/')[1]}"
    assert request.text == (out / "kernel.py").read_text(encoding="utf-8")
    assert (request.language, request.kernel_type) == ("python", "script")
    assert (request.is_private, request.enable_tpu, request.enable_internet) == (True, True, False)
    assert request.model_data_sources == meta["model_sources"]
    assert request.dataset_data_sources == [s.replace(kernels.PLACEHOLDER_USERNAME, "alice")
                                            for s in meta["dataset_sources"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"title": "Abc"}, "field 'title': must be at least five"),
        ({"code_file": "missing.py"}, "field 'code_file'.*missing.py does not exist"),
        ({"id": "alice/abc"}, "field 'id'.*shorter than five"),
        ({"id": "alice/tarr-sentiment-gemma/3"}, "field 'id': cannot contain a version"),
        ({"language": "julia"}, "field 'language'"),
        ({"kernel_type": "dashboard"}, "field 'kernel_type'"),
        ({"enable_tpu": "yes"}, "field 'enable_tpu'"),
        ({"dataset_sources": ["nodataset"]}, "field 'dataset_sources'"),
        ({"kernel_sources": ["alice/abc"]}, "field 'kernel_sources'"),
        ({"model_sources": ["google/gemma-2/flax/gemma2-2b-it"]}, "field 'model_sources'"),
        ({"model_sources": ["google/gemma-2/flax/gemma2-2b-it/latest"]}, "field 'model_sources'"),
        ({"docker_image_pinning_type": "newest"}, "field 'docker_image_pinning_type'"),
    ],
)
def test_invalid_metadata_is_refused_like_the_kaggle_cli(change, message, kaggle_api, tmp_path):
    out = build("tarr-sentiment", tmp_path / "built", username="alice")
    meta = {**json.loads((out / "kernel-metadata.json").read_text()), **change}
    (out / "kernel-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(KernelError, match=message):
        validate_metadata(meta, out)
    with pytest.raises(ValueError):
        kaggle_api.kernels_push(str(out))
    assert kaggle_api.pushed == []


def test_our_validation_also_requires_every_field(tmp_path):
    out = build("template", tmp_path / "built", username="alice")
    meta = json.loads((out / "kernel-metadata.json").read_text())
    del meta["enable_internet"]
    with pytest.raises(KernelError, match=r"missing fields \['enable_internet'\]"):
        validate_metadata(meta, out)
    meta = {**json.loads((out / "kernel-metadata.json").read_text()), "enable_gpu": True}
    with pytest.raises(KernelError, match="pick one accelerator"):
        validate_metadata(meta, out)


def _load_module(code_file: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, code_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", TASKS)
def test_built_code_is_the_shared_runner_with_the_task_filled_in(task, clean_home, tmp_path):
    source = REPO / "kernels" / task
    settings = kernels.read_settings(source / "kernel.py")
    out = build(task, tmp_path / "k", username="alice")
    code = (out / "kernel.py").read_text(encoding="utf-8")
    runner = (REPO / "kernels" / "runner.py").read_text(encoding="utf-8")
    # Every line outside the block the build fills is the runner's, unchanged.
    head = runner[:runner.index("# ---- set by the build\n")]
    tail = runner[runner.index("\nWHEELS_GLOB = "):]
    first_line, _, body = code.split("\n", 2)  # two lines of header, then the runner
    assert first_line.startswith(f"# Built by `python -m kaggle_pipeline.kernels build {task}`")
    assert body.startswith(head) and body.endswith(tail)
    filled = body[len(head):-len(tail)].splitlines()
    assigned = [line.split(" = ")[0] for line in filled if re.match(r"[A-Z][A-Z0-9_]* = ", line)]
    assert assigned == ["TASK", "SUBMISSION_FILE", "INPUTS", "CONFIG_TOML", "PACKAGE_ZIP_B64"]

    kernel = _load_module(out / "kernel.py", f"built_{task.replace('-', '_')}")
    assert kernel.TASK == task
    assert kernel.SUBMISSION_FILE == settings.submission_file
    assert kernel.INPUTS == settings.inputs and list(kernel.INPUTS) == list(settings.inputs)
    assert kernel.CONFIG_TOML == (source / "config.toml").read_text(encoding="utf-8")


def test_kernel_folders_hold_only_their_settings():
    """What differs between kernels is two literals; the code they run is kernels/runner.py."""
    expected = {"aihub-dialogue": ("submission.csv", ["train_file", "test_file", "model_dir"]),
                "dolly-en-ko": ("submission.csv",
                                ["train_en", "train_ko", "test_en", "test_ko", "model_dir"]),
                "tarr-sentiment": ("submission.tsv", ["train_file", "test_file", "model_dir"]),
                "template": ("submission.tsv", ["train_file", "test_file", "model_dir"])}
    for task in TASKS:
        settings = kernels.read_settings(REPO / "kernels" / task / "kernel.py")
        assert (settings.submission_file, list(settings.inputs)) == expected[task], task
        assert sorted(p.name for p in (REPO / "kernels" / task).iterdir()
                      if p.name != "__pycache__") == [
            "config.toml", "kernel-metadata.json", "kernel.py"], task


def test_the_runner_alone_is_no_kernel(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "kernels" / "runner.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "kernels/runner.py is no kernel by itself: build one with" in result.stderr


SETTINGS = ('SUBMISSION_FILE = "submission.tsv"\n'
            'INPUTS = {"train_file": "**/d/train.tsv", "test_file": "**/d/test.tsv",\n'
            '          "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*"}\n')


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SETTINGS + "def main():\n    pass\n",
         r"kernel.py: line 4: only SUBMISSION_FILE and INPUTS belong here; the code every kernel "
         r"runs is runner.py"),
        ('TASK = "template"\n' + SETTINGS, r"kernel.py: line 1: only SUBMISSION_FILE and INPUTS"),
        ("import os\n" + SETTINGS, r"kernel.py: line 1: only SUBMISSION_FILE and INPUTS"),
        (SETTINGS + 'SUBMISSION_FILE = "submission.csv"\n',
         r"kernel.py: line 4: SUBMISSION_FILE is set twice"),
        (SETTINGS.replace("INPUTS", "INPUT"), r"kernel.py: line 2: only SUBMISSION_FILE and"),
        (SETTINGS.split("INPUTS")[0], r"kernel.py: INPUTS not set"),
        (SETTINGS.replace('"submission.tsv"', '"out/submission.tsv"'),
         r"kernel.py: line 1: SUBMISSION_FILE: 'out/submission.tsv' is not a file name"),
        (SETTINGS.replace('"submission.tsv"', '"submission.parquet"'),
         r"kernel.py: line 1: SUBMISSION_FILE: 'submission.parquet' does not end in one of"),
        (SETTINGS.replace('"submission.tsv"', '"submission" + ".tsv"'),
         r"kernel.py: line 1: SUBMISSION_FILE must be a literal"),
        (SETTINGS.replace('"train_file"', '"train file"'),
         r"kernel.py: line 2: INPUTS: 'train file' is not a placeholder name"),
        (SETTINGS.replace('"train_file"', '"working_dir"'),
         r"kernel.py: line 2: INPUTS: 'working_dir' is filled by every kernel already"),
        (SETTINGS.replace('"**/d/train.tsv"', '""'),
         r"kernel.py: line 2: INPUTS: must be a dict of placeholder name -> glob strings"),
        (SETTINGS + "INPUTS = [\n", r"kernel.py: line 4: not Python"),
    ],
)
def test_build_refuses_kernel_settings_that_are_not_just_settings(settings, message, clean_home,
                                                                   tmp_path):
    kernels_dir = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels" / "template", kernels_dir / "template")
    shutil.copyfile(REPO / "kernels" / "runner.py", kernels_dir / "runner.py")
    settings_file = kernels_dir / "template" / "kernel.py"
    settings_file.write_text(SETTINGS)
    out = build("template", tmp_path / "out", username="alice", kernels_dir=kernels_dir)
    built = (out / "kernel.py").read_bytes()
    settings_file.write_text(settings)
    with pytest.raises(KernelError, match=message) as err:
        build("template", out, username="alice", kernels_dir=kernels_dir, force=True)
    assert str(err.value).startswith(str(settings_file))
    assert (out / "kernel.py").read_bytes() == built  # a refused build leaves the earlier one


def _rendered_config(task: str) -> tuple[str, dict[str, str]]:
    """The kernel's config with its placeholders filled as on Kaggle: each input a path under
    /kaggle/input shaped like its glob."""
    source = REPO / "kernels" / task
    inputs = kernels.read_settings(source / "kernel.py").inputs
    values = {name: "/kaggle/input/" + glob.replace("**/", "").replace("[0-9]*", "1")
              for name, glob in inputs.items()}
    values |= {"input_root": "/kaggle/input", "working_dir": "/kaggle/working"}
    text = (source / "config.toml").read_text(encoding="utf-8")
    return string.Template(text).substitute(values), values


@pytest.mark.parametrize("task", TASKS)
def test_kernel_configs_follow_the_run_config_schema(task, tmp_path):
    from kaggle_pipeline.run_config import load_config
    from kaggle_pipeline.run_setup import input_paths, task_spec

    text, values = _rendered_config(task)
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / "run.toml")  # unknown sections or keys raise
    spec = task_spec(cfg)
    assert spec.name == (task if task != "template" else "tarr-sentiment")
    model_dir = values["model_dir"]
    assert model_dir == "/kaggle/input/gemma-2/flax/gemma2-2b-it/1"
    assert cfg.model.checkpoint == model_dir  # the loader finds the Orbax folder inside
    assert cfg.model.tokenizer == f"{model_dir}/tokenizer.model"
    assert cfg.model.preset == "gemma2-2b-it"
    assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "bfloat16")
    assert (cfg.train.mesh_data, cfg.train.mesh_fsdp, cfg.train.mesh_model) == (1, 8, 1)
    assert cfg.data.batch_size % 8 == 0 and cfg.train.predict
    assert cfg.output.dir == "/kaggle/working/runs"
    assert cfg.output.submissions == "/kaggle/working/submissions"
    for field in ("train", "test"):
        paths = input_paths(spec, getattr(cfg.data, field), f"data.{field}")
        for path in paths if isinstance(paths, tuple) else (paths,):
            assert str(path).startswith("/kaggle/input/") and path.suffix in (
                ".tsv", ".json", ".jsonl"), (field, path)
    # The file the kernel copies its submission to has the competition's format.
    submission = kernels.read_settings(REPO / "kernels" / task / "kernel.py").submission_file
    test = input_paths(spec, cfg.data.test)
    test = test[0] if isinstance(test, tuple) else test
    expected = ".tsv" if spec.kind == "classification" and test.suffix == ".tsv" else ".csv"
    assert Path(submission).suffix == expected


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("\n[train]\n", "\n[train]\nsteps = 300\n"), r"config.toml: config section "
                                                      r"\[train\]: unknown key\(s\) \['steps'\]"),
        (("\n[train]\n", "\n[train\n"), r"template/config.toml: not valid TOML"),
        (('task = "tarr-sentiment"', 'task = "nope"'),
         r"config.toml: data.task = 'nope': expected one of 'tarr-sentiment'"),
        (('dtype = "bfloat16"', 'dtype = "float32"'),
         r"config.toml: model.dtype = 'float32'; a TPU kernel uses 'bfloat16'"),
        (("mesh_fsdp = 8", "mesh_fsdp = 2"), r"config.toml: train.mesh_data x mesh_fsdp x "
                                             r"mesh_model = 1 x 2 x 1 does not use the 8"),
        (("batch_size = 8", "batch_size = 12"), r"data.batch_size = 12 does not split"),
        (('train = "${train_file}"', 'train = "${train_path}"'),
         r"placeholder\(s\) \['train_path'\] are not filled by the kernel"),
    ],
)
def test_build_refuses_a_config_train_would_refuse(edit, message, tmp_path):
    kernels_dir = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels" / "template", kernels_dir / "template")
    shutil.copyfile(REPO / "kernels" / "runner.py", kernels_dir / "runner.py")
    config = kernels_dir / "template" / "config.toml"
    old, new = edit
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new, 1))
    with pytest.raises(KernelError, match=message):
        build("template", tmp_path / "out", username="alice", kernels_dir=kernels_dir)
    assert not (tmp_path / "out").exists()


def test_build_needs_the_runner_and_a_config(tmp_path):
    kernels_dir = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels" / "template", kernels_dir / "template")
    with pytest.raises(KernelError, match=r"kernels/runner.py: missing \(the code every kernel"):
        build("template", tmp_path / "out", username="alice", kernels_dir=kernels_dir)
    shutil.copyfile(REPO / "kernels" / "runner.py", kernels_dir / "runner.py")
    (kernels_dir / "template" / "config.toml").unlink()
    with pytest.raises(KernelError, match=r"template/config.toml: missing \(run config\)"):
        build("template", tmp_path / "out", username="alice", kernels_dir=kernels_dir)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- build


def _all_bytes(folder: Path) -> list[tuple[str, bytes]]:
    """Every file of the build, plus every member of the bundle embedded in the code file."""
    files = [(str(p), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]
    with zipfile.ZipFile(io.BytesIO(_embedded_bundle(folder / "kernel.py"))) as bundle:
        files += [(f"bundle:{n}", bundle.read(n)) for n in bundle.namelist()]
    return files


def _embedded_bundle(code_file: Path) -> bytes:
    code = code_file.read_text(encoding="utf-8")
    match = re.search(r"^PACKAGE_ZIP_B64 = \((.*?)^\)", code, re.MULTILINE | re.DOTALL)
    return base64.b64decode("".join(re.findall(r'"([A-Za-z0-9+/=]+)"', match.group(1))))


def test_build_bundles_the_package_and_no_credentials(secret_home, tmp_path, capsys):
    out = build("tarr-sentiment", tmp_path / "built")  # username from ~/.kaggle/kaggle.json
    meta = json.loads((out / "kernel-metadata.json").read_text())
    assert meta["id"] == "alice/tarr-sentiment-gemma"
    assert meta["dataset_sources"] == ["alice/tarr-review-sentiment"]

    package = REPO / "kaggle_pipeline"
    expected = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                      if "__pycache__" not in p.parts)
    copied = sorted(p.relative_to(out / "kaggle_pipeline").as_posix()
                    for p in (out / "kaggle_pipeline").rglob("*") if p.is_file())
    assert copied == expected and "kernels.py" in expected
    with zipfile.ZipFile(io.BytesIO(_embedded_bundle(out / "kernel.py"))) as bundle:
        assert bundle.namelist() == [f"kaggle_pipeline/{name}" for name in expected]
        assert bundle.read("kaggle_pipeline/evaluation/metrics.py") == (
            package / "evaluation" / "metrics.py").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.toml", "kaggle_pipeline", "kernel-metadata.json", "kernel.py"]

    for name, data in _all_bytes(out):
        for secret in SECRETS.values():
            assert secret.encode() not in data, name
    assert not any(s in capsys.readouterr().out for s in SECRETS.values())


def test_build_leaves_stray_files_out_and_refuses_a_leaked_secret(secret_home, tmp_path):
    package = tmp_path / "kaggle_pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kaggle.json").write_text(json.dumps({"key": SECRETS["key"]}))
    (package / "notes.txt").write_text("x")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.py").write_text("")
    out = build("template", tmp_path / "built", package_dir=package)
    assert [p.name for p in (out / "kaggle_pipeline").iterdir()] == ["__init__.py"]

    (package / "oops.py").write_text(f"KEY = {SECRETS['file_token']!r}\n")
    with pytest.raises(KernelError, match="contains a Kaggle credential value") as err:
        build("template", tmp_path / "built2", package_dir=package)
    assert SECRETS["file_token"] not in str(err.value)
    assert not (tmp_path / "built2").exists()


def test_build_errors(clean_home, tmp_path):
    with pytest.raises(KernelError, match="no Kaggle username: pass --username"):
        build("template", tmp_path / "a")
    with pytest.raises(KernelError, match="unknown kernel 'nope'.*known: aihub-dialogue"):
        build("nope", tmp_path / "a", username="alice")
    with pytest.raises(KernelError, match="is not a Kaggle username"):
        build("template", tmp_path / "a", username="bad/name")
    out = build("template", tmp_path / "a", username="alice")
    with pytest.raises(KernelError, match="exists and is not empty"):
        build("template", out, username="alice")
    assert build("template", out, username="bob", force=True) == out
    assert json.loads((out / "kernel-metadata.json").read_text())["id"].startswith("bob/")


def test_build_with_force_refuses_an_out_that_overlaps_its_sources(clean_home, tmp_path):
    """`--force --out kernels/<task>` would delete the kernel's own source; any folder that
    holds or lies inside what the build reads is refused before anything is removed."""
    kernels_dir = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels" / "template", kernels_dir / "template")
    shutil.copyfile(REPO / "kernels" / "runner.py", kernels_dir / "runner.py")
    before = sorted(p.relative_to(tmp_path) for p in kernels_dir.rglob("*"))
    for out in (kernels_dir / "template", kernels_dir / "template" / "build", kernels_dir,
                tmp_path, REPO / "kaggle_pipeline" / "build", REPO):
        with pytest.raises(KernelError, match=rf"--out {re.escape(str(out))}: overlaps "):
            build("template", out, username="alice", force=True, kernels_dir=kernels_dir)
    assert sorted(p.relative_to(tmp_path) for p in kernels_dir.rglob("*")) == before
    assert not (REPO / "kaggle_pipeline" / "build").exists()
    assert kernels.main(["build", "template", "--out", str(kernels_dir / "template"), "--force",
                         "--username", "alice", "--kernels-dir", str(kernels_dir)]) == 2
    assert (kernels_dir / "template" / "kernel-metadata.json").is_file()


def test_build_cli(clean_home, tmp_path, capsys):
    assert kernels.main(["build", "dolly-en-ko", "--out", str(tmp_path / "k"),
                         "--username", "carol"]) == 0
    assert "push it with: python -m kaggle_pipeline.kernels push" in capsys.readouterr().out
    assert kernels.main(["build", "dolly-en-ko", "--out", str(tmp_path / "k")]) == 2
    assert "error: no Kaggle username" in capsys.readouterr().err


# ---------------------------------------------------------------- push


@pytest.fixture
def recorded_subprocess(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(kernels.subprocess, "run", fake_run)
    return calls


def test_push_without_credentials_fails_clearly(clean_home, tmp_path, recorded_subprocess,
                                                capsys):
    out = build("tarr-sentiment", tmp_path / "k", username="alice")
    assert kernels.credential_sources() == []
    assert kernels.main(["push", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: no Kaggle credentials" in err
    for place in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "KAGGLE_KEY", "kaggle.json"):
        assert place in err
    assert recorded_subprocess == []


@pytest.mark.parametrize("source", ["env_token", "env_user_key", "kaggle_json", "access_token"])
def test_push_with_credentials_runs_the_kaggle_cli(source, clean_home, tmp_path, monkeypatch,
                                                   recorded_subprocess, capsys):
    kaggle_dir = clean_home / ".kaggle"
    kaggle_dir.mkdir()
    if source == "env_token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", SECRETS["token"])
    elif source == "env_user_key":
        monkeypatch.setenv("KAGGLE_USERNAME", "alice")
        monkeypatch.setenv("KAGGLE_KEY", SECRETS["key"])
    elif source == "kaggle_json":
        (kaggle_dir / "kaggle.json").write_text(
            json.dumps({"username": "alice", "key": SECRETS["key"]}))
    else:
        (kaggle_dir / "access_token").write_text(SECRETS["file_token"])
    out = build("tarr-sentiment", tmp_path / "k", username="alice")
    assert kernels.main(["push", str(out)]) == 0
    (command,) = recorded_subprocess
    assert command[-4:] == ["kernels", "push", "-p", str(out)]
    assert command[:-4] == kernels.kaggle_command()
    printed = capsys.readouterr()
    assert not any(s in printed.out + printed.err for s in SECRETS.values())


def test_push_refuses_an_unbuilt_kernel(secret_home, recorded_subprocess):
    with pytest.raises(KernelError, match="still owned by 'your-kaggle-username'"):
        kernels.push(REPO / "kernels" / "tarr-sentiment")
    assert recorded_subprocess == []


# ---------------------------------------------------------------- simulated kernel run

TRAIN_REVIEWS = 24
TEST_REVIEWS = 8
# The smoke-run settings the kernel passes on to train: a tiny checkpoint needs its preset, and
# two host devices stand in for the eight TPU cores (eight would each hold a full copy of the
# 262k-way label-scoring logits in this machine's RAM).
DEVICES = 2
SMOKE_OVERRIDES = (f"model.preset=tiny-gemma2 train.max_steps=2 train.mesh_fsdp={DEVICES} "
                   f"data.batch_size={DEVICES}")


def _head(source: Path, out: Path, rows: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return out


def _tiny_gemma2(model_dir: Path) -> None:
    """Kaggle's Flax Gemma 2 layout, tiny: an Orbax checkpoint (the FLAT layout Kaggle ships)
    of random params beside tokenizer.model (Gemma 3's, whose 262k vocabulary the tiny preset
    has)."""
    from kaggle_pipeline.checkpoints.orbax_format import save_orbax
    from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
    from kaggle_pipeline.data.tokenizer import Tokenizer
    from kaggle_pipeline.model import abstract_params
    from kaggle_pipeline.model.config import tiny_config

    rng = np.random.default_rng(0)
    params = _random_like(abstract_params(tiny_config("gemma2", vocab_size=262_144)), rng)
    save_orbax(params, model_dir / "gemma2-2b-it")
    Tokenizer.from_gguf(gemma3_270m_gguf()).save(model_dir / "tokenizer.model")


def _random_like(tree, rng):
    if isinstance(tree, dict):
        return {k: _random_like(v, rng) for k, v in tree.items()}
    return (0.3 * rng.standard_normal(tree.shape)).astype(np.float32)


def _kaggle_input(root: Path) -> Path:
    """/kaggle/input as the tarr kernel sees it: its dataset and the Gemma 2 model mount."""
    data = root / "tarr-review-sentiment"
    _head(REPO / "data" / "tarr" / "train.tsv", data / "train.tsv", TRAIN_REVIEWS)
    _head(REPO / "data" / "tarr" / "test.tsv", data / "test.tsv", TEST_REVIEWS)
    _tiny_gemma2(root / "gemma-2" / "flax" / "gemma2-2b-it" / "1")
    return root


# Loaded at start-up by every Python process of a kernel run (the kernel keeps PYTHONPATH for
# the train it starts): no socket may connect, and each process leaves its pid as proof.
NO_NETWORK = """
import os, socket

def _refuse(self, *args, **kwargs):
    raise OSError(f"network call attempted: {args}")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
with open(os.environ["NO_NETWORK_LOG"], "a") as log:
    log.write(f"{os.getpid()}\\n")
"""


def _run_kernel(code_file: Path, input_root: Path, working: Path, cwd: Path, *,
                overrides: str = "", timeout: float = 300):
    guard = cwd / "no_network"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TMPDIR": str(cwd),
           "KAGGLE_INPUT_ROOT": str(input_root), "KAGGLE_WORKING_DIR": str(working),
           "KAGGLE_PIPELINE_OVERRIDES": overrides, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "PYTHONPATH": str(guard), "NO_NETWORK_LOG": str(guard / "pids")}
    return subprocess.run([sys.executable, str(code_file)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_built_kernel_trains_predicts_and_writes_the_submission(clean_home, tmp_path):
    from kaggle_pipeline.run_config import load_config

    out = build("tarr-sentiment", tmp_path / "k", username="alice")
    shutil.rmtree(out / "kaggle_pipeline")  # as on Kaggle: only the code file is uploaded
    (out / "config.toml").unlink()
    input_root = _kaggle_input(tmp_path / "input")
    working = tmp_path / "working"
    result = _run_kernel(out / "kernel.py", input_root, working, tmp_path,
                         overrides=SMOKE_OVERRIDES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len((tmp_path / "no_network" / "pids").read_text().split()) >= 2  # kernel + train

    config = working / "tarr-sentiment.toml"
    assert f"-m kaggle_pipeline.train --config {config} {SMOKE_OVERRIDES}" in result.stdout
    cfg = load_config(config)
    model_dir = input_root / "gemma-2" / "flax" / "gemma2-2b-it" / "1"
    assert cfg.model.checkpoint == str(model_dir)
    assert cfg.model.tokenizer == str(model_dir / "tokenizer.model")
    assert cfg.data.train == str(input_root / "tarr-review-sentiment" / "train.tsv")
    assert (cfg.output.dir, cfg.output.submissions) == (str(working / "runs"),
                                                        str(working / "submissions"))
    # The package ran from the bundle extracted outside the working dir, sharded over the
    # devices and in bfloat16, as configured for the TPU.
    bundle = re.search(r"package: (\S+)", result.stdout).group(1)
    assert Path(bundle).name.startswith("kaggle_pipeline_src_")
    assert working not in Path(bundle).parents
    assert f"mesh {{'data': 1, 'fsdp': {DEVICES}, 'model': 1}}" in result.stdout
    assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "bfloat16")

    run = working / "runs" / "tarr-sentiment"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["validation"]["accuracy"] <= 1.0
    assert (run / "adapter" / "lora_config.json").is_file()
    (written,) = (working / "submissions").iterdir()
    assert summary["submission"] == str(written)
    submission = working / "submission.tsv"
    assert submission.read_bytes() == written.read_bytes()
    test_lines = (input_root / "tarr-review-sentiment" / "test.tsv").read_text().splitlines()
    lines = submission.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\tcomment\tlabel" and len(lines) == TEST_REVIEWS + 1
    for line, original in zip(lines[1:], test_lines[1:], strict=True):
        kept, _, label = line.rpartition("\t")
        assert kept == original and label in ("0", "1")


def test_kernel_names_a_missing_input(clean_home, tmp_path):
    out = build("tarr-sentiment", tmp_path / "k", username="alice")
    (tmp_path / "input").mkdir()
    result = _run_kernel(out / "kernel.py", tmp_path / "input", tmp_path / "w", tmp_path)
    assert result.returncode != 0
    assert ("tarr-sentiment: input 'train_file': expected one match of "
            "'**/tarr-review-sentiment/train.tsv'") in result.stderr


def test_kernel_refuses_a_stale_or_wrong_submission(clean_home, tmp_path):
    """The copy step takes only what this run wrote, in the competition's format."""
    out = build("tarr-sentiment", tmp_path / "k", username="alice")
    kernel = _load_module(out / "kernel.py", "tarr_kernel")
    folder = tmp_path / "submissions"
    folder.mkdir()
    old = folder / "tarr-sentiment-old.tsv"
    old.write_text("id\tlabel\n")
    os.utime(old, (1_000_000, 1_000_000))
    with pytest.raises(SystemExit, match="wrote no submission in"):
        kernel.newest_submission(folder, since=2_000_000)
    (folder / "tarr-sentiment-new.csv").write_text("id,label\n")
    with pytest.raises(SystemExit, match=r"takes a \.tsv file \(submission.tsv\)"):
        kernel.newest_submission(folder, since=2_000_000)
    newest = folder / "tarr-sentiment-newer.tsv"
    newest.write_text("id\tlabel\n")
    os.utime(newest, (time.time() + 5, time.time() + 5))
    assert kernel.newest_submission(folder, since=2_000_000) == newest
    assert kernel.submissions_dir('[output]\nsubmissions = "subs"\n', [], tmp_path) == \
        tmp_path / "subs"
    assert kernel.submissions_dir("", ["output.submissions=/x/y"], tmp_path) == Path("/x/y")
