"""A command restarts itself once with tcmalloc (or the allocator KAGGLE_PIPELINE_MALLOC names)
before it imports jax; importing the package never does; a bad setting is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from kaggle_pipeline import host_malloc


def _run(*args: str, malloc: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in (host_malloc.SWITCH, "LD_PRELOAD") and not k.startswith("_KAGGLE")}
    if malloc is not None:
        env[host_malloc.SWITCH] = malloc
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _a_shared_library() -> Path:
    """A small ELF library present wherever numpy's wheel is: stands in for an allocator."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    return min(libs.glob("libquadmath*.so*"))


def test_a_command_runs_with_tcmalloc_when_the_machine_has_it():
    out = _run("-m", "kaggle_pipeline.host_malloc")
    assert out.returncode == 0, out.stderr
    if host_malloc.find_tcmalloc():
        assert out.stdout.startswith("libtcmalloc"), out.stdout
        assert "/libtcmalloc" in out.stdout
    else:
        assert "no tcmalloc on this machine" in out.stdout
    # "system" keeps glibc's malloc whatever the machine has.
    assert _run("-m", "kaggle_pipeline.host_malloc", malloc="system").stdout.startswith(
        "glibc malloc (KAGGLE_PIPELINE_MALLOC=system)")


def test_a_library_named_by_path_is_preloaded_and_a_refused_one_restarts_only_once():
    library = _a_shared_library()
    out = _run("-m", "kaggle_pipeline.host_malloc", malloc=str(library))
    assert out.returncode == 0, out.stderr
    assert f"({library})" in out.stdout  # mapped into the restarted process

    # Not a library: the loader ignores it; without the guard the command would restart forever.
    out = _run("-m", "kaggle_pipeline.host_malloc", malloc=str(Path(__file__)))
    assert out.returncode == 0, out.stderr
    assert "cannot be preloaded" in out.stderr
    assert out.stdout.startswith("glibc malloc: the dynamic loader did not preload")


def test_a_missing_library_is_one_line_before_anything_runs_and_imports_are_left_alone():
    out = _run("-m", "kaggle_pipeline.train", "--help", malloc="/nowhere/libtcmalloc.so")
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: KAGGLE_PIPELINE_MALLOC='/nowhere/libtcmalloc.so': no "
                                  "such file (expected \"tcmalloc\", \"system\" or the path of "
                                  "an allocator's shared library)")
    assert out.stdout == ""
    # Importing the package (a notebook, these tests) neither restarts nor checks the setting.
    out = _run("-c", "import kaggle_pipeline, os; print(os.getpid() > 0)",
               malloc="/nowhere/libtcmalloc.so")
    assert (out.returncode, out.stdout) == (0, "True\n")
