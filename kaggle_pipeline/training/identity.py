"""What a run was trained from: the content of its training files and of its base checkpoint,
and the settings that change what training computes. Two runs with the same identity train the
same model, so a run directory may only be resumed (or predicted from) under its own identity.

Files are identified by their SHA-256, not their path: a train file edited in place is another
run, the same file moved is not. A checkpoint of several gigabytes is hashed once: the hash is
cached under `~/.cache/kaggle_pipeline/` ($XDG_CACHE_HOME is respected) by (path, size,
modification time), so it is recomputed only when the file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from kaggle_pipeline.files import read_json_object, write_text_atomically

IDENTITY_FILE = "identity.json"
_CACHE_NAME = "file_hashes.json"
_BLOCK = 1 << 20


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kaggle_pipeline"


def _read_cache(path: Path) -> dict:
    return read_json_object(path) or {}


def file_hash(path: str | os.PathLike, cache: Path | None = None) -> str:
    """SHA-256 of a file's bytes, cached by (absolute path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = (cache or cache_dir()) / _CACHE_NAME
    known = _read_cache(cache_file)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    value = digest.hexdigest()
    # Drop the entries of this path's older versions and of files that are gone (temporary
    # runs), so the cache stays small; one that cannot be written only costs a re-hash.
    known = {k: v for k, v in _read_cache(cache_file).items()
             if k.rsplit("|", 2)[0] != str(path) and os.path.exists(k.rsplit("|", 2)[0])}
    known[key] = value
    try:
        write_text_atomically(cache_file, json.dumps(known, indent=0, sort_keys=True))
    except OSError:
        pass
    return value


def files_of(path: str | os.PathLike) -> list[Path]:
    """A file, or every file under a directory (an HF or Orbax checkpoint), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def content(paths: Iterable[str | os.PathLike], cache: Path | None = None) -> dict[str, str]:
    """{file: sha256} of files and directories; a directory's files keyed relative to it."""
    hashes = {}
    for root in paths:
        root = Path(root)
        for file in files_of(root):
            name = str(root) if file == root else f"{root}/{file.relative_to(root)}"
            hashes[name] = file_hash(file, cache)
    return hashes


def identity(train_files: Iterable[str | os.PathLike], model_files: Iterable[str | os.PathLike],
             settings: Mapping, cache: Path | None = None) -> dict:
    """The identity of a run: {"train": {file: hash}, "model": {file: hash}, "settings": ...}.

    File keys keep their names only to say what changed; the comparison is on content."""
    return {"train": content(train_files, cache), "model": content(model_files, cache),
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=list))}


def differences(saved: Mapping, current: Mapping) -> list[str]:
    """What differs between two identities, in words; [] when they are the same run."""
    found = []
    for part, what in (("train", "the training data"), ("model", "the base checkpoint")):
        before, now = saved.get(part, {}), current.get(part, {})
        if sorted(before.values()) != sorted(now.values()):
            changed = [name for name, value in now.items() if before.get(name) != value]
            named = f" ({', '.join(changed[:3])})" if changed else ""
            found.append(f"{what}{named} changed")
    before, now = saved.get("settings", {}), current.get("settings", {})
    changed = sorted(key for key in {*before, *now} if before.get(key) != now.get(key))
    if changed:
        found.append("the settings " + ", ".join(changed) + " changed")
    return found


def load(run_dir: Path) -> dict | None:
    return read_json_object(run_dir / IDENTITY_FILE)


def save(run_dir: Path, value: Mapping) -> None:
    write_text_atomically(run_dir / IDENTITY_FILE, json.dumps(value, indent=2) + "\n")
