"""Training checkpoints: trainable params, optimizer state and step, with Orbax (no pickle).

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint; the last `keep` steps are kept.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 2):
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

    def restore_latest(self, like: dict, shardings) -> dict | None:
        """The newest checkpoint laid out like `like` (shapes, dtypes, shardings), or None."""
        step = self._manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              like, shardings)
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self._manager.wait_until_finished()
