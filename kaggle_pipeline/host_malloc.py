"""tcmalloc for the commands' own process, when the machine has it.

XLA:CPU allocates a program's buffers afresh on every call. glibc's malloc serves blocks that
large with mmap and unmaps them when they are freed, so each train step faults its whole working
set back in: 450k page faults a step, a quarter of a core spent in the kernel, for the 270M at
4 x 256 tokens. tcmalloc keeps freed pages for the next call: that step takes 3.6 s instead of
4.2, the main job 112 s instead of 124, with the same results bit for bit (BENCHMARKS.md §1, §5).

A running process cannot change its allocator. So a command (`python -m kaggle_pipeline.train`,
`.predict`, ...) restarts itself once, before it imports jax, with the library in LD_PRELOAD.
Importing the package from Python (a notebook) changes nothing; the test suite restarts the
same way (tests/conftest.py).

KAGGLE_PIPELINE_MALLOC: unset or "tcmalloc" uses gperftools' tcmalloc if the system has it
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`); "system" keeps glibc's malloc; a path
preloads that library instead (a tcmalloc or jemalloc shipped with a Kaggle dataset).

`python -m kaggle_pipeline.host_malloc` says which allocator a command gets; the commands that
load a model log it too.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

SWITCH = "KAGGLE_PIPELINE_MALLOC"
# Set in the restarted process, so that a library the loader refused cannot restart it again.
_RESTARTED = "_KAGGLE_PIPELINE_MALLOC_RESTARTED"
# gperftools' sonames: the minimal build (Debian/Ubuntu libtcmalloc-minimal4) and the full one
# (libgoogle-perftools4, which TPU VM images carry).
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc() -> str | None:
    """The soname of the system's tcmalloc (resolvable by the dynamic loader), or None."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def wanted_library() -> str | None:
    """The library KAGGLE_PIPELINE_MALLOC asks for: None for glibc's malloc.

    Raises ValueError for a path that is not a file (better than the loader's warning)."""
    choice = os.environ.get(SWITCH, "").strip() or "tcmalloc"
    if choice == "system" or sys.platform != "linux":
        return None
    if choice == "tcmalloc":
        return find_tcmalloc()
    if not Path(choice).is_file():
        raise ValueError(f"{SWITCH}={choice!r}: no such file (expected \"tcmalloc\", "
                         "\"system\" or the path of an allocator's shared library)")
    return choice


def mapped(library: str) -> str | None:
    """Where `library` (a soname or a path) is mapped into this process, or None. The maps name
    the file behind the soname's symlink (libtcmalloc_minimal.so.4 -> ....so.4.5.10)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    wanted = Path(library).resolve() if "/" in library else None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        path = Path(fields[5])
        if path == wanted or (wanted is None and (path.name == library
                                                  or path.name.startswith(library + "."))):
            return str(path)
    return None


def restart_needed() -> str | None:
    """The library `restart_with_allocator` would preload, or None when it would not restart
    this process (raises ValueError for a bad KAGGLE_PIPELINE_MALLOC)."""
    if os.environ.get(_RESTARTED):
        return None
    library = wanted_library()
    return library if library is not None and mapped(library) is None else None


def restart_with_allocator() -> None:
    """Re-executes this command with the wanted allocator preloaded; returns when there is
    nothing to do (glibc wanted, the library already loaded, or already restarted once)."""
    try:
        library = restart_needed()
    except ValueError as e:  # a user error: one line, as the commands report theirs
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if library is None:
        return
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    # gperftools' full build (TPU VMs, Colab) prints a line for each allocation over 1 GB.
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}
    os.execve(sys.executable, sys.orig_argv,
              {**quiet, **os.environ, "LD_PRELOAD": preload, _RESTARTED: "1"})


def describe() -> str:
    """One line: the allocator this process runs with, and how to change it."""
    try:
        library = wanted_library()
    except ValueError as e:
        return f"glibc malloc ({e})"
    if library is not None and (path := mapped(library)):
        return f"{Path(path).name} ({path}); {SWITCH}=system keeps glibc's malloc"
    if library is not None and os.environ.get(_RESTARTED):
        return (f"glibc malloc: the dynamic loader did not preload {library} (its message "
                "above says why)")
    if library is not None:
        return (f"glibc malloc: {library} is installed but not loaded (a command run as "
                "`python -m kaggle_pipeline.<command>` restarts itself with it)")
    if os.environ.get(SWITCH, "").strip() == "system":
        return f"glibc malloc ({SWITCH}=system)"
    return ("glibc malloc: no tcmalloc on this machine (Debian/Ubuntu: apt-get install "
            "libtcmalloc-minimal4; CPU train steps run about 1.15x faster with it)")


if __name__ == "__main__":
    restart_with_allocator()
    print(describe())
