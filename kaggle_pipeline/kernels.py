"""Build and push the Kaggle kernels under `kernels/<task>/`.

    python -m kaggle_pipeline.kernels build <task> --out <dir> [--username U] [--force]
    python -m kaggle_pipeline.kernels build <name> --config run.toml [section.key=value ...]
        --out <dir> [--username U] [--dataset SLUG | --competition SLUG] [--force]
    python -m kaggle_pipeline.kernels push <dir>

Every kernel runs the same code, kernels/runner.py; a kernel folder holds only what differs: its
metadata, its run config (config.toml) and its settings (kernel.py: SUBMISSION_FILE and INPUTS).
`kaggle kernels push` uploads only the metadata and the code file, not the rest of the folder,
so `build` writes the code file as the runner with the task's name and settings, its config.toml
and the package source (a base64 zip of kaggle_pipeline/*.py) filled in; plain copies of the
package and the config beside it show what was bundled. Before that, `build` checks the config
against the run-config schema (kaggle_pipeline/run_config.py) with its placeholders filled, so a
wrong key fails here and not an hour into a Kaggle session; a TPU kernel must compute in bfloat16
on all 8 cores.

`build --config` makes a kernel for any task a run config defines (a [task] of its own, say):
the kernel folder is the template's (kernels/template: Gemma 2 2B-IT on a TPU v3-8, in bfloat16
on all 8 cores, its model mount) with the config's data, task, LoRA, optimizer and training
settings, named <name>. The kernel finds the config's files by their names under the input
root: data.train, data.test and task.sample_submission become `**/<SLUG>/<file name>`, where
SLUG is the dataset you upload the files as (--dataset, default `<name>-data`, owned by you) or
the competition whose files Kaggle mounts (--competition). Settings the TPU needs (e.g.
data.batch_size a multiple of 8) can be given as section.key=value after the config.

The kernel's owner is filled in from --username, $KAGGLE_USERNAME or the
`username` field of kaggle.json. No credential value is ever read into the output, printed or
written: `push` only checks that the kaggle CLI will find credentials, then runs it.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kaggle_pipeline.cli import run_command
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.files import read_json_object

PACKAGE_DIR = Path(__file__).resolve().parent
KERNELS_DIR = PACKAGE_DIR.parent / "kernels"
METADATA_FILE = "kernel-metadata.json"
CONFIG_FILE = "config.toml"
RUNNER_FILE = "runner.py"  # in KERNELS_DIR, shared by every kernel
# What the code file of a kernel folder (kernel.py) sets; the build refuses anything else there.
SETTINGS = ("SUBMISSION_FILE", "INPUTS")
SUBMISSION_SUFFIXES = (".csv", ".tsv")  # what the runner copies from the run's submissions
PLACEHOLDER_USERNAME = "your-kaggle-username"

# What `kaggle kernels push` accepts (kaggle 2.x, KaggleApi.kernels_push).
VALID_LANGUAGES = ("python", "r", "rmarkdown")
VALID_KERNEL_TYPES = ("script", "notebook")
VALID_PINNING_TYPES = ("original", "latest")
# Fields every kernel of ours states explicitly, so nothing falls back to a CLI default.
REQUIRED_FIELDS = ("id", "title", "code_file", "language", "kernel_type", "is_private",
                   "enable_gpu", "enable_tpu", "enable_internet", "dataset_sources",
                   "competition_sources", "kernel_sources", "model_sources")
BOOL_FIELDS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
SOURCE_FIELDS = ("dataset_sources", "competition_sources", "kernel_sources", "model_sources")

TPU_DEVICES = 8  # a Kaggle TPU VM v3-8 / v5e-8
# Placeholders every kernel fills, besides one per INPUTS entry of its kernel.py.
BUILTIN_PLACEHOLDERS = ("input_root", "working_dir")

_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_BUNDLED_SUFFIXES = (".py",)
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed, so the same source gives the same bundle


class KernelError(UserError):
    """A kernel folder or metadata file that the kaggle CLI would refuse."""


class CredentialsMissing(UserError):
    """The kaggle CLI would find no credentials."""


# ---------------------------------------------------------------- metadata


def _slugify(text: str) -> str:
    # python-slugify's result for ASCII titles: lower-case words joined by '-'.
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))


def _check_bool(meta: Mapping, field: str, where: str) -> None:
    value = meta[field]
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return
    raise KernelError(f"{where}: field {field!r}: {value!r} is not a boolean")


def _check_kernel_ref(ref: str, where: str, field: str) -> None:
    parts = ref.split("/")
    if "/" not in ref or len(parts) > 3 or not parts[0] or not parts[1]:
        raise KernelError(f"{where}: field {field!r}: {ref!r} is not "
                          "'<username>/<kernel-slug>[/<version>]'")
    if len(parts[1]) < 5:
        raise KernelError(f"{where}: field {field!r}: kernel slug {parts[1]!r} is shorter than "
                          "five characters")
    if len(parts) == 3 and not parts[2]:
        raise KernelError(f"{where}: field {field!r}: empty version in {ref!r}")


def validate_metadata(meta: Mapping, folder: str | os.PathLike) -> None:
    """Refuse what `kaggle kernels push` refuses, naming the field.

    Stricter than the CLI in three ways: every field of REQUIRED_FIELDS must be present, GPU and
    TPU cannot both be on, and the title must slugify to the id's slug (the CLI only warns).
    """
    folder = Path(folder)
    where = str(folder / METADATA_FILE)
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise KernelError(f"{where}: missing fields {missing}")
    title = meta["title"]
    if not isinstance(title, str) or len(title) < 5:
        raise KernelError(f"{where}: field 'title': must be at least five characters")
    code_file = meta["code_file"]
    if not code_file:
        raise KernelError(f"{where}: field 'code_file': a source file must be specified")
    if not (folder / code_file).is_file():
        raise KernelError(f"{where}: field 'code_file': {folder / code_file} does not exist")
    _check_kernel_ref(meta["id"], where, "id")
    if len(meta["id"].split("/")) == 3:
        raise KernelError(f"{where}: field 'id': cannot contain a version")
    if _slugify(title) != meta["id"].split("/")[1].lower():
        raise KernelError(f"{where}: field 'title': {title!r} does not slugify to the id's slug "
                          f"{meta['id'].split('/')[1]!r}")
    if meta["language"] not in VALID_LANGUAGES:
        raise KernelError(f"{where}: field 'language': {meta['language']!r} is not one of "
                          f"{VALID_LANGUAGES}")
    if meta["kernel_type"] not in VALID_KERNEL_TYPES:
        raise KernelError(f"{where}: field 'kernel_type': {meta['kernel_type']!r} is not one of "
                          f"{VALID_KERNEL_TYPES}")
    for field in BOOL_FIELDS:
        _check_bool(meta, field, where)
    if str(meta["enable_gpu"]).lower() == "true" and str(meta["enable_tpu"]).lower() == "true":
        raise KernelError(f"{where}: fields 'enable_gpu' and 'enable_tpu': pick one accelerator")
    for field in SOURCE_FIELDS:
        if not isinstance(meta[field], list) or not all(isinstance(s, str) for s in meta[field]):
            raise KernelError(f"{where}: field {field!r}: must be a list of strings")
    for ref in meta["dataset_sources"]:
        parts = ref.split("/")
        if "/" not in ref or not parts[0] or not parts[1] or len(parts) > 3:
            raise KernelError(f"{where}: field 'dataset_sources': {ref!r} is not "
                              "'<username>/<dataset-slug>[/<version>]'")
    for ref in meta["kernel_sources"]:
        _check_kernel_ref(ref, where, "kernel_sources")
    for ref in meta["model_sources"]:
        parts = ref.split("/")
        if len(parts) != 5 or not all(parts) or not parts[4].isdigit():
            raise KernelError(f"{where}: field 'model_sources': {ref!r} is not "
                              "'<owner>/<model>/<framework>/<instance>/<version-number>'")
    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in VALID_PINNING_TYPES:
        raise KernelError(f"{where}: field 'docker_image_pinning_type': {pinning!r} is not one "
                          f"of {VALID_PINNING_TYPES}")


def load_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise KernelError(f"{path}: no kernel metadata file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KernelError(f"{path}: line {err.lineno}: not JSON ({err.msg})") from None


def with_username(meta: Mapping, username: str) -> dict:
    """The metadata with the placeholder owner replaced in the id and the user's own sources."""
    def fill(ref: str) -> str:
        owner, _, rest = ref.partition("/")
        return f"{username}/{rest}" if owner == PLACEHOLDER_USERNAME else ref

    filled = dict(meta)
    filled["id"] = fill(meta["id"])
    for field in SOURCE_FIELDS:
        filled[field] = [fill(ref) for ref in meta.get(field, [])]
    return filled


# ---------------------------------------------------------------- credentials (never values)


def kaggle_config_dir() -> Path:
    """Where the kaggle CLI looks for kaggle.json (KaggleApi.config_dir)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(xdg) / "kaggle"
    return legacy


def _read_json_fields(path: Path) -> dict:
    return read_json_object(path) or {}


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text(encoding="utf-8").strip())
    except OSError:
        return False


def credential_sources() -> list[str]:
    """Names of the places the kaggle CLI would take credentials from; no values."""
    found = []
    token = os.environ.get("KAGGLE_API_TOKEN")
    if token:
        found.append("KAGGLE_API_TOKEN")
    home_kaggle = Path.home() / ".kaggle"
    for name in ("access_token", "access_token.txt"):
        if _nonempty_file(home_kaggle / name):
            found.append(f"~/.kaggle/{name}")
    config = kaggle_config_dir() / "kaggle.json"
    fields = _read_json_fields(config) if config.is_file() else {}
    has_user = bool(os.environ.get("KAGGLE_USERNAME") or fields.get("username"))
    has_key = bool(os.environ.get("KAGGLE_KEY") or fields.get("key"))
    if has_user and has_key:
        found.append(f"{config} / KAGGLE_USERNAME+KAGGLE_KEY")
    if _read_json_fields(home_kaggle / "credentials.json").get("refresh_token"):
        found.append("~/.kaggle/credentials.json (kaggle auth login)")
    return found


def _credential_values() -> list[str]:
    """Secret values present on this machine, only to make sure none ends up in a build."""
    values = [os.environ.get("KAGGLE_KEY", ""), os.environ.get("KAGGLE_API_TOKEN", "")]
    home_kaggle = Path.home() / ".kaggle"
    # KAGGLE_API_TOKEN may also name a file that holds the token.
    token_files = [home_kaggle / "access_token", home_kaggle / "access_token.txt"]
    if values[1] and len(values[1]) < 4096:
        token_files.append(Path(values[1]))
    for path in token_files:
        if path.is_file():
            values.append(path.read_text(encoding="utf-8", errors="ignore"))
    values.append(str(_read_json_fields(kaggle_config_dir() / "kaggle.json").get("key", "")))
    oauth = _read_json_fields(home_kaggle / "credentials.json")
    values += [str(oauth.get("refresh_token", "")), str(oauth.get("access_token", ""))]
    # Short values (e.g. a stray "1") would match everywhere and are no secret.
    return [v.strip() for v in values if len(v.strip()) >= 8]


def resolve_username(username: str | None = None) -> str:
    """--username, else $KAGGLE_USERNAME, else the `username` of kaggle.json or of the OAuth
    credentials file."""
    candidates = [
        (username, "--username"),
        (os.environ.get("KAGGLE_USERNAME"), "KAGGLE_USERNAME"),
        (_read_json_fields(kaggle_config_dir() / "kaggle.json").get("username"),
         str(kaggle_config_dir() / "kaggle.json")),
        (_read_json_fields(Path.home() / ".kaggle" / "credentials.json").get("username"),
         "~/.kaggle/credentials.json"),
    ]
    for value, source in candidates:
        if value:
            if not _USERNAME.fullmatch(str(value)):
                raise KernelError(f"{source}: {value!r} is not a Kaggle username")
            return str(value)
    raise KernelError("no Kaggle username: pass --username, set KAGGLE_USERNAME or put "
                      f"'username' in {kaggle_config_dir() / 'kaggle.json'}")


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class KernelSettings:
    """What kernels/<task>/kernel.py sets: all of a kernel's code that is its own."""

    submission_file: str  # written to the working dir, e.g. "submission.csv"
    inputs: dict[str, str]  # config placeholder -> glob under the input root


def read_settings(code_path: Path) -> KernelSettings:
    """SUBMISSION_FILE and INPUTS of a kernel folder's kernel.py, read without running it.

    The file holds these two literals and at most a docstring, so no runner code can be copied
    into a kernel folder again."""
    try:
        tree = ast.parse(code_path.read_text(encoding="utf-8"), filename=str(code_path))
    except OSError as err:
        raise KernelError(f"{code_path}: cannot read the kernel's settings ({err})") from None
    except SyntaxError as err:
        raise KernelError(f"{code_path}: line {err.lineno}: not Python ({err.msg})") from None
    values, lines = {}, {}
    statements = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    for node in statements:
        single = isinstance(node, ast.Assign) and len(node.targets) == 1
        name = node.targets[0].id if single and isinstance(node.targets[0], ast.Name) else None
        if name not in SETTINGS:
            raise KernelError(f"{code_path}: line {node.lineno}: only {' and '.join(SETTINGS)} "
                              f"belong here; the code every kernel runs is {RUNNER_FILE}")
        if name in values:
            raise KernelError(f"{code_path}: line {node.lineno}: {name} is set twice")
        try:
            values[name] = ast.literal_eval(node.value)
        except (ValueError, TypeError):  # a name, a call, an unhashable key
            raise KernelError(f"{code_path}: line {node.lineno}: {name} must be a literal") \
                from None
        lines[name] = node.lineno
    missing = [name for name in SETTINGS if name not in values]
    if missing:
        raise KernelError(f"{code_path}: {' and '.join(missing)} not set")
    submission, inputs = values["SUBMISSION_FILE"], values["INPUTS"]
    where = f"{code_path}: line {lines['SUBMISSION_FILE']}: SUBMISSION_FILE"
    if not isinstance(submission, str) or Path(submission).name != submission:
        raise KernelError(f"{where}: {submission!r} is not a file name")
    if Path(submission).suffix not in SUBMISSION_SUFFIXES:
        raise KernelError(f"{where}: {submission!r} does not end in one of {SUBMISSION_SUFFIXES}")
    where = f"{code_path}: line {lines['INPUTS']}: INPUTS"
    if not (isinstance(inputs, dict) and inputs and all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in inputs.items())):
        raise KernelError(f"{where}: must be a dict of placeholder name -> glob strings")
    for name in inputs:
        # The names config.toml can write as ${name}: string.Template's identifiers.
        if not name.isidentifier() or not name.isascii():
            raise KernelError(f"{where}: {name!r} is not a placeholder name")
        if name in BUILTIN_PLACEHOLDERS:
            raise KernelError(f"{where}: {name!r} is filled by every kernel already")
    return KernelSettings(submission, inputs)


def check_config(config_text: str, inputs: Mapping[str, str], config_path: Path, *,
                 tpu: bool):
    """The run config the kernel will train with, its placeholders filled with stand-in paths;
    KernelError naming the file and the key when train would refuse it or TPU settings are
    off. Returns the RunConfig."""
    from kaggle_pipeline.run_config import load_config
    from kaggle_pipeline.run_setup import task_spec

    known = {*BUILTIN_PLACEHOLDERS, *inputs}
    used = set()
    for match in string.Template.pattern.finditer(config_text):
        if match.group("invalid") is not None:
            raise KernelError(f"{config_path}: a '$' that is no placeholder (write '$$')")
        used.add(match.group("named") or match.group("braced"))
    unknown = sorted(used - known - {None})
    if unknown:
        raise KernelError(f"{config_path}: placeholder(s) {unknown} are not filled by the "
                          f"kernel; known: {sorted(known)}")
    rendered = string.Template(config_text).safe_substitute(
        {name: f"/kaggle/input/{name}" for name in known})
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / CONFIG_FILE
        file.write_text(rendered, encoding="utf-8")
        try:
            cfg = load_config(file)
            task_spec(cfg)
        except ValueError as err:  # ConfigError, an unknown task
            message = str(err).replace(str(file), str(config_path))
            if not message.startswith(str(config_path)):
                message = f"{config_path}: {message}"
            raise KernelError(message) from None
    if tpu:
        for key in ("dtype", "param_dtype"):
            if getattr(cfg.model, key) != "bfloat16":
                raise KernelError(f"{config_path}: model.{key} = "
                                  f"{getattr(cfg.model, key)!r}; a TPU kernel uses 'bfloat16'")
        train = cfg.train
        fixed = train.mesh_fsdp * train.mesh_model
        data = TPU_DEVICES // fixed if train.mesh_data == -1 else train.mesh_data
        if data * fixed != TPU_DEVICES:
            raise KernelError(f"{config_path}: train.mesh_data x mesh_fsdp x mesh_model = "
                              f"{train.mesh_data} x {train.mesh_fsdp} x {train.mesh_model} "
                              f"does not use the {TPU_DEVICES} TPU cores")
        if cfg.data.batch_size % (data * train.mesh_fsdp):
            raise KernelError(f"{config_path}: data.batch_size = {cfg.data.batch_size} does "
                              f"not split over the {data * train.mesh_fsdp} batch shards of "
                              "the mesh")
    return cfg


# ---------------------------------------------------------------- build


def available_tasks(kernels_dir: Path = KERNELS_DIR) -> list[str]:
    return sorted(p.name for p in kernels_dir.iterdir() if (p / METADATA_FILE).is_file())


def _package_files(package_dir: Path) -> list[Path]:
    """The package's source files: *.py only, so no cache, data or stray secret file rides
    along."""
    return sorted(p for p in package_dir.rglob("*")
                  if p.is_file() and p.suffix in _BUNDLED_SUFFIXES
                  and "__pycache__" not in p.parts)


def bundle_package(package_dir: Path) -> bytes:
    """A zip of kaggle_pipeline/*.py with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in _package_files(package_dir):
            name = (Path(package_dir.name) / path.relative_to(package_dir)).as_posix()
            bundle.writestr(zipfile.ZipInfo(name, _ZIP_DATE), path.read_bytes(),
                            compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _set_constant(code: str, name: str, literal: str, code_path: Path) -> str:
    pattern = re.compile(rf"^{name} = None\b.*$", re.MULTILINE)
    if len(pattern.findall(code)) != 1:
        raise KernelError(f"{code_path}: expected one line '{name} = None' for the build to fill")
    return pattern.sub(lambda _: f"{name} = {literal}", code)


def kernel_code(runner: str, task: str, settings: KernelSettings, config_text: str,
                bundle: bytes, runner_path: Path) -> str:
    """The self-contained code file of a kernel: the runner with everything of the task in it."""
    encoded = base64.b64encode(bundle).decode("ascii")
    chunks = "\n".join(f'    "{encoded[i:i + 96]}"' for i in range(0, len(encoded), 96))
    inputs = "".join(f"    {name!r}: {glob!r},\n" for name, glob in settings.inputs.items())
    code = runner
    for name, literal in (("TASK", repr(task)),
                          ("SUBMISSION_FILE", repr(settings.submission_file)),
                          ("INPUTS", f"{{\n{inputs}}}"),
                          ("CONFIG_TOML", repr(config_text)),
                          ("PACKAGE_ZIP_B64", f"(\n{chunks}\n)")):
        code = _set_constant(code, name, literal, runner_path)
    return (f"# Built by `python -m kaggle_pipeline.kernels build {task}` from "
            f"kernels/{RUNNER_FILE},\n# kernels/{task}/kernel.py and kernels/{task}/{CONFIG_FILE}"
            ": edit those, not this file.\n" + code)


def _scan_for_secrets(out: Path, secrets: Sequence[str]) -> None:
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                if secret.encode() in data:
                    raise KernelError(f"{path}: contains a Kaggle credential value; "
                                      "the build was removed")


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_out(out: Path, protected: Sequence[Path]) -> None:
    """Refuse an output folder that holds, or lies inside, a source the build reads (a kernel
    folder, the runner, the package): --force would delete it."""
    for path in protected:
        if _overlaps(out, path):
            raise KernelError(f"--out {out}: overlaps {path}, which the build reads; build into "
                              "a folder of its own, e.g. build/kernels/<task>")
    if out.resolve() in (Path.home().resolve(), Path("/"), Path.cwd().resolve()):
        raise KernelError(f"--out {out}: build into a folder of its own, e.g. "
                          "build/kernels/<task>")


def build(task: str, out: str | os.PathLike, *, username: str | None = None,
          force: bool = False, kernels_dir: str | os.PathLike = KERNELS_DIR,
          package_dir: str | os.PathLike = PACKAGE_DIR) -> Path:
    """Write kernels/<task>/ to `out` as Kaggle runs it: the metadata with the owner filled in
    and the code file (kernels/runner.py with the task's settings, config and package)."""
    kernels_dir, package_dir, out = Path(kernels_dir), Path(package_dir), Path(out)
    source = kernels_dir / task
    check_out(out, [source, kernels_dir / RUNNER_FILE, package_dir, KERNELS_DIR, PACKAGE_DIR])
    if not (source / METADATA_FILE).is_file():
        raise KernelError(f"unknown kernel {task!r}: no {source / METADATA_FILE}; known: "
                          f"{', '.join(available_tasks(kernels_dir))}")
    meta = with_username(load_metadata(source), resolve_username(username))
    validate_metadata(meta, source)
    runner_path, config_path = kernels_dir / RUNNER_FILE, source / CONFIG_FILE
    for path, what in ((runner_path, "the code every kernel runs"), (config_path, "run config")):
        if not path.is_file():
            raise KernelError(f"{path}: missing ({what})")
    settings = read_settings(source / meta["code_file"])
    config_text = config_path.read_text(encoding="utf-8")
    check_config(config_text, settings.inputs, config_path,
                 tpu=str(meta["enable_tpu"]).lower() == "true")
    if out.exists() and any(out.iterdir()):
        if not (force and (out / METADATA_FILE).is_file()):
            raise KernelError(f"{out}: exists and is not empty (--force replaces an earlier "
                              "build)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        code = kernel_code(runner_path.read_text(encoding="utf-8"), task, settings, config_text,
                           bundle_package(package_dir), runner_path)
        (out / meta["code_file"]).write_text(code, encoding="utf-8")
        (out / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        for path in _package_files(package_dir):
            target = out / package_dir.name / path.relative_to(package_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        validate_metadata(meta, out)
        _scan_for_secrets(out, _credential_values())
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- a kernel from a run config

TEMPLATE = "template"
_KERNEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{2,48}[a-z0-9]")


def _kaggle_path(value: str) -> bool:
    return value.startswith(("/kaggle/", "${"))


def kernel_config(cfg, name: str, template_config: Path, inputs: Mapping[str, str]) -> str:
    """The run config of a kernel made from `cfg`: its files as the kernel's placeholders, the
    template's model (unless `cfg` already names one under /kaggle), TPU mesh and outputs."""
    import dataclasses

    from kaggle_pipeline.run_config import load_config, to_toml

    template = load_config(template_config)
    model = cfg.model if _kaggle_path(cfg.model.checkpoint) else template.model
    train = dataclasses.replace(cfg.train, mesh_data=template.train.mesh_data,
                                mesh_fsdp=template.train.mesh_fsdp,
                                mesh_model=template.train.mesh_model, predict=True)
    data = dataclasses.replace(cfg.data, train="${train_file}", test="${test_file}")
    task = dataclasses.replace(cfg.task, sample_submission="${sample_file}"
                               if "sample_file" in inputs else "")
    output = dataclasses.replace(template.output, name=name)
    kernel = dataclasses.replace(cfg, model=model, train=train, data=data, task=task,
                                 output=output)
    whose = "its own" if model is cfg.model else "the template's"
    header = (f"# Run config of the kernel {name!r}, made by `kernels build --config` from a "
              f"run config:\n# its task and training settings, {whose} model, the template's "
              "TPU mesh and outputs.\n")
    return header + to_toml(kernel)


def kernel_from_config(name: str, config: str | os.PathLike, overrides: Sequence[str],
                       folder: Path, *, dataset: str | None = None,
                       competition: str | None = None) -> Path:
    """Write the kernel folder `folder/<name>` (metadata, kernel.py, config.toml) for the task
    a run config defines; `build` then turns it into what Kaggle runs."""
    from kaggle_pipeline.run_config import load_config
    from kaggle_pipeline.run_setup import input_paths, task_spec

    if not _KERNEL_NAME.fullmatch(name):
        raise KernelError(f"kernel name {name!r}: 4 to 50 lower-case letters, digits and '-'")
    if dataset and competition:
        raise KernelError("give --dataset or --competition, not both")
    cfg = load_config(config, list(overrides))
    spec = task_spec(cfg)
    files = {}
    for field, key in (("train", "train_file"), ("test", "test_file")):
        value = getattr(cfg.data, field)
        paths = input_paths(spec, value, f"data.{field}") if value else None
        if isinstance(paths, tuple):
            raise KernelError(f"data.{field}: task {spec.name!r} reads several files; "
                              "kernels build --config takes tasks that read one file each")
        if paths is None:
            raise KernelError(f"data.{field} is empty: a kernel trains and predicts")
        files[key] = paths.name
    if spec.sample_submission:
        files["sample_file"] = Path(spec.sample_submission).name
    slug = competition or dataset or f"{name}-data"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", slug):
        raise KernelError(f"--dataset/--competition {slug!r} is not a Kaggle slug")
    template = KERNELS_DIR / TEMPLATE
    meta = load_metadata(template)
    words = name.split("-")
    title = " ".join(w.capitalize() for w in words + ([] if "gemma" in words else ["gemma"]))
    meta = {**meta, "id": f"{PLACEHOLDER_USERNAME}/{_slugify(title)}", "title": title,
            "dataset_sources": [] if competition else [f"{PLACEHOLDER_USERNAME}/{slug}"],
            "competition_sources": [competition] if competition else []}
    template_inputs = read_settings(template / meta["code_file"]).inputs
    inputs = {key: f"**/{slug}/{file}" for key, file in files.items()}
    inputs["model_dir"] = template_inputs["model_dir"]
    reference = Path(spec.sample_submission) if spec.sample_submission else \
        input_paths(spec, cfg.data.test, "data.test")
    suffix = reference.suffix.lower() if reference.suffix.lower() in SUBMISSION_SUFFIXES \
        else ".csv"
    kernel = folder / name
    kernel.mkdir(parents=True)
    (kernel / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (kernel / CONFIG_FILE).write_text(kernel_config(cfg, name, template / CONFIG_FILE, inputs),
                                      encoding="utf-8")
    (kernel / meta["code_file"]).write_text(
        f'"""Kernel {name!r}, made from {Path(config).name} by kernels build --config."""\n\n'
        f"SUBMISSION_FILE = {'submission' + suffix!r}\nINPUTS = {inputs!r}\n", encoding="utf-8")
    shutil.copyfile(KERNELS_DIR / RUNNER_FILE, folder / RUNNER_FILE)
    return kernel


# ---------------------------------------------------------------- push


def kaggle_command() -> list[str]:
    exe = shutil.which("kaggle")
    return [exe] if exe else [sys.executable, "-m", "kaggle"]


def push(folder: str | os.PathLike) -> int:
    """Run `kaggle kernels push -p <folder>` once the folder and the credentials check out;
    returns the CLI's exit code."""
    folder = Path(folder)
    meta = load_metadata(folder)
    validate_metadata(meta, folder)
    if meta["id"].split("/")[0] == PLACEHOLDER_USERNAME:
        raise KernelError(f"{folder / METADATA_FILE}: field 'id': still owned by "
                          f"{PLACEHOLDER_USERNAME!r}; build it with --username")
    if not credential_sources():
        raise CredentialsMissing(
            "no Kaggle credentials: the kaggle CLI reads $KAGGLE_API_TOKEN, "
            "~/.kaggle/access_token, $KAGGLE_USERNAME + $KAGGLE_KEY, or "
            f"{kaggle_config_dir() / 'kaggle.json'} "
            "(username and key); create an API token at kaggle.com/settings and put it in one "
            "of these")
    command = [*kaggle_command(), "kernels", "push", "-p", str(folder)]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaggle_pipeline.kernels",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="copy kernels/<task> and bundle the package")
    build_cmd.add_argument("task", help="a folder of kernels/, or with --config the new "
                           "kernel's name")
    build_cmd.add_argument("--config", help="make the kernel from this run config's task")
    build_cmd.add_argument("overrides", nargs="*", help="with --config: section.key=value")
    build_cmd.add_argument("--dataset", help="with --config: the dataset slug holding the files "
                           "(default <name>-data)")
    build_cmd.add_argument("--competition", help="with --config: the competition whose files "
                           "the kernel reads")
    build_cmd.add_argument("--out", required=True, type=Path)
    build_cmd.add_argument("--username")
    build_cmd.add_argument("--force", action="store_true",
                           help="replace an earlier build in --out")
    build_cmd.add_argument("--kernels-dir", type=Path, default=KERNELS_DIR)
    push_cmd = commands.add_parser("push", help="kaggle kernels push -p <dir>")
    push_cmd.add_argument("dir", type=Path)
    args, extra = parser.parse_known_args(argv)
    # section.key=value may also come after the options.
    settings = [item for item in extra if "=" in item and not item.startswith("-")]
    if len(settings) != len(extra) or (settings and args.command != "build"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "build":
        args.overrides = [*args.overrides, *settings]
    if args.command == "build" and args.config is None and (
            args.overrides or args.dataset or args.competition):
        parser.error("section.key=value, --dataset and --competition go with --config")

    def body() -> int:
        if args.command == "push":
            return push(args.dir)
        if args.config is None:
            out = build(args.task, args.out, username=args.username, force=args.force,
                        kernels_dir=args.kernels_dir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                made = kernel_from_config(args.task, args.config, args.overrides, Path(tmp),
                                          dataset=args.dataset, competition=args.competition)
                try:
                    out = build(args.task, args.out, username=args.username,
                                force=args.force, kernels_dir=Path(tmp))
                except KernelError as err:  # name the user's file, not the temporary copy
                    raise KernelError(str(err).replace(
                        str(made / CONFIG_FILE), f"{args.config} (in the kernel)")) from None
            meta = load_metadata(out)
            sources = meta["competition_sources"] or meta["dataset_sources"]
            print(f"the kernel finds its files under {sources[0]} (by their names) and the "
                  f"model under {meta['model_sources'][0]}")
        print(f"built {out} ({(out / load_metadata(out)['code_file']).stat().st_size} bytes "
              "of code); push it with: python -m kaggle_pipeline.kernels push "
              f"{out}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
