"""What every command shares: one runner (a user error is one line and exit 2, an interrupted
run says how to resume, compiled programs kept on disk), log lines and progress bars."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from kaggle_pipeline.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Stop(Exception):
    """A command stopped early on purpose (a signal, a non-finite loss); the message says why
    and what to do, `exit_code` is the process's exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def compilation_cache_dir() -> Path:
    """Where compiled programs are kept between runs: $XDG_CACHE_HOME (or ~/.cache) /
    kaggle_pipeline/jax."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kaggle_pipeline" / "jax"


def enable_compilation_cache() -> None:
    """jax's persistent compilation cache, unless the user configured one (or turned it off
    with JAX_ENABLE_COMPILATION_CACHE=false): a rerun, a resumed run, predict after train and
    the folds of a cross-validation load the train step and the scoring programs instead of
    compiling them again (10-20 s each for the 270M on 2 CPU cores)."""
    import jax

    if jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))


def run_command(body: Callable[[], object]) -> int:
    """Runs a command's body: its exit code when it returns one (else 0), 2 with one line on a
    user error, the Stop's own code when it stops early, 130 for a Ctrl-C outside the training
    loop (which saves first and stops itself). Bugs keep their traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    enable_compilation_cache()
    try:
        result = body()
    except Stop as stop:
        print(f"\n{stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except UserError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _one_line(message: str, limit: int = 600) -> str:
    """A user error as one line of bounded length: a row's text quoted in it must not flood the
    terminal."""
    line = " ".join(message.strip().splitlines())
    return line if len(line) <= limit else line[:limit - 5] + " ..."


class _LineProgress:
    """A progress report for logs: one line every `every` items (and at the end) instead of a
    bar redrawn in place, which a file records as one line per redraw."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every = max(1, total // 10)
        self.start = time.time()
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        if self.n // self.every != before // self.every or self.n == self.total:
            rate = (self.n - self.initial) / max(time.time() - self.start, 1e-9)
            extra = f" ({self.postfix})" if self.postfix else ""
            log(f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s{extra}")

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm bar on a terminal, one log line per tenth of the work otherwise."""
    if sys.stdout.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    file=sys.stdout, mininterval=1.0)
    return _LineProgress(total, desc, unit, initial)


def iterate(items: Iterable, total: int, desc: str, unit: str = "it"):
    """Yields `items` while reporting progress."""
    bar = progress(total, desc, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
