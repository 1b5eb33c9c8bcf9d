"""Training checkpoints: trainable params, optimizer state and step, with Orbax (no pickle).

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint; the last `keep` steps are kept (at least
one: the step a stopped run resumes from). A step that cannot be read back (a damaged disk, a
file truncated by hand) is moved aside to `damaged-<step>` and the newest intact one is used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from kaggle_pipeline.cli import log


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep = {keep}: at least the latest checkpoint must be kept")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: dict, step: int) -> None:
        if self._manager.latest_step() == step:
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step out of the manager's sight (kept for inspection, not deleted)."""
        source = self.directory / str(step)
        target = self.directory / f"damaged-{step}"
        if target.exists():
            target = self.directory / f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(source, target)
        self._manager.reload()
        return target

    def restore_latest(self, like: dict, shardings) -> dict | None:
        """The newest intact checkpoint laid out like `like` (shapes, dtypes, shardings), or
        None when there is none. Damaged steps are set aside, saying which and why."""
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              like, shardings)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self._manager.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as err:  # noqa: BLE001 -- Orbax and tensorstore raise many kinds
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                moved = self._set_aside(step)
                log(f"warning: checkpoint step {step} cannot be read ({type(err).__name__}: "
                    f"{reason}); moved it to {moved}, trying the one before")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()
