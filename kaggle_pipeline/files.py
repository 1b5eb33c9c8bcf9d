"""Writing files and directories atomically: a reader sees the old version or the new one,
never half of one, and an interrupted write leaves the old version in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *,
                     mode: int = 0o644) -> Path:
    """Call write(temp_path) beside `path`, flush it to disk, then rename it over `path`.

    On any error (or Ctrl-C) the temporary file is removed and `path` is left as it was. The
    file gets `mode` (mkstemp would leave it readable by its owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(temp)
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, mode & ~_umask())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`; None when the file is missing, unreadable or holds no object
    (a cache or a summary that can be rebuilt, never a user's input)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def readable_by_all(root: Path) -> None:
    """Folders 0755 and files 0644 (less the umask) under `root`: what writers that use
    mkstemp (safetensors, mkdtemp) leave readable by their owner only."""
    umask = _umask()
    os.chmod(root, 0o755 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644 & ~umask)


def atomic_directory(out_dir: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Fill a temporary directory beside `out_dir`, then rename it into place, replacing any
    old one only once the new one is complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old = None
    try:
        fill(tmp)
        readable_by_all(tmp)
        if out_dir.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
