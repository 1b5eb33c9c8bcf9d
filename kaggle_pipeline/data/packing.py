"""Token sequences -> fixed-length packed rows -> batches.

A row holds several examples back to back; `segment_ids` (1, 2, ... per example, 0 = padding)
keep attention inside each example and `positions` restart at 0 for each one.
`targets[i]` is True when token i is to be predicted (from position i - 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass
class PackStats:
    examples: int = 0
    truncated: int = 0  # examples cut to fit the row length
    dropped: int = 0  # examples with no target token left after truncation
    real_tokens: int = 0
    row_tokens: int = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / computed tokens."""
        return self.real_tokens / max(self.row_tokens, 1)

    def summary(self) -> str:
        return (f"{self.examples} examples in {self.row_tokens} token slots, "
                f"padding efficiency {self.efficiency:.1%}, truncated {self.truncated}, "
                f"dropped {self.dropped}")


# tokens, positions, segment_ids, targets, example_index (which input example, -1 = padding)
Batch = dict[str, np.ndarray]


def truncate(ids: np.ndarray, targets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the end of an over-long example when its targets are there (the answer), else
    the start; the cut is counted by the caller."""
    if len(ids) <= max_len:
        return ids, targets
    last_target = int(np.nonzero(targets)[0][-1]) if targets.any() else len(ids) - 1
    start = max(0, min(last_target + 1, len(ids)) - max_len)
    return ids[start:start + max_len], targets[start:start + max_len]


def pack(examples: Sequence[tuple], seq_len: int, *,
         pack_rows: bool = True) -> tuple[list[Batch], PackStats]:
    """First-fit-decreasing packing of (ids, targets) pairs into rows of seq_len tokens.

    An example may be (ids, targets, branches): label scoring's prompt, then each label's tokens
    as a branch. `branches` holds per-token arrays: "positions", "branch_ids" (0 = the prompt)
    and "sources" (the index in the example of the token that predicts each one). Such an
    example must fit a row whole, and the rows then carry `branch_ids` and `sources` too.
    With pack_rows=False every example gets a row of its own (the padded baseline).
    """
    stats = PackStats()
    items = []
    origin = []  # index in `examples` of each kept item
    branched = any(len(example) == 3 for example in examples)
    for index, (ids, targets, *rest) in enumerate(examples):
        ids, targets = np.asarray(ids, np.int32), np.asarray(targets, bool)
        n = len(ids)
        if n > seq_len:
            if rest:
                raise ValueError(f"a branched example of {n} tokens does not fit rows of "
                                 f"{seq_len}")
            stats.truncated += 1
            ids, targets = truncate(ids, targets, seq_len)
            n = len(ids)
        # An unbranched example is one trunk: positions from 0, each token predicted by the last.
        branches = rest[0] if rest else {"positions": np.arange(n), "branch_ids": np.zeros(n),
                                         "sources": np.arange(n) - 1}
        if not targets[1:].any():
            stats.dropped += 1
            continue
        items.append((ids, targets, branches))
        origin.append(index)
    stats.examples = len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0])) if pack_rows else \
        range(len(items))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(items[i][0])
        slot = next((r for r, space in enumerate(free) if space >= n), None) if pack_rows else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    packed = []
    for members in rows:
        row = {k: np.zeros(seq_len, dt) for k, dt in (("tokens", np.int32), ("positions", np.int32),
                                                      ("segment_ids", np.int32),
                                                      ("targets", bool))}
        row["example_index"] = np.full(seq_len, -1, np.int32)
        if branched:
            row["branch_ids"] = np.zeros(seq_len, np.int32)
            row["sources"] = np.zeros(seq_len, np.int32)
        cursor = 0
        for seg, i in enumerate(sorted(members), start=1):
            ids, targets, branches = items[i]
            n = len(ids)
            row["tokens"][cursor:cursor + n] = ids
            row["positions"][cursor:cursor + n] = branches["positions"]
            row["segment_ids"][cursor:cursor + n] = seg
            row["example_index"][cursor:cursor + n] = origin[i]
            if branched:
                row["branch_ids"][cursor:cursor + n] = branches["branch_ids"]
                row["sources"][cursor:cursor + n] = cursor + np.asarray(branches["sources"])
            # The first token of an example is never a target: nothing precedes it in its segment.
            row["targets"][cursor + 1:cursor + n] = targets[1:]
            cursor += n
        stats.real_tokens += cursor
        stats.row_tokens += seq_len
        packed.append(row)
    return packed, stats


def batch_order(num_rows: int, batch_size: int, *, seed: int, epoch: int,
                shuffle: bool = True, drop_last: bool = False) -> list[np.ndarray]:
    """Row indices of each batch of an epoch: a deterministic order per (seed, epoch)."""
    order = np.arange(num_rows)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    groups = [order[start:start + batch_size] for start in range(0, num_rows, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    return groups


def batches(rows: list[Batch], batch_size: int, *, seed: int, epoch: int,
            shuffle: bool = True, drop_last: bool = False) -> Iterator[Batch]:
    """The batches of `batch_order`; the last partial batch is padded with empty rows."""
    for indices in batch_order(len(rows), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                               drop_last=drop_last):
        chosen = [rows[i] for i in indices]
        if len(chosen) < batch_size:
            empty = {k: np.zeros_like(v) for k, v in chosen[0].items()}
            empty["example_index"] = np.full_like(chosen[0]["example_index"], -1)
            chosen += [empty] * (batch_size - len(chosen))
        yield {k: np.stack([r[k] for r in chosen]) for k in chosen[0]}


def target_tokens_per_batch(rows: list[Batch], batch_size: int, *, seed: int,
                            epoch: int) -> list[int]:
    """How many target tokens each batch of the epoch holds, without building the batches."""
    per_row = np.array([int(r["targets"].sum()) for r in rows])
    return [int(per_row[i].sum()) for i in batch_order(len(rows), batch_size, seed=seed,
                                                       epoch=epoch)]


def num_batches(num_rows: int, batch_size: int, drop_last: bool = False) -> int:
    return num_rows // batch_size if drop_last else -(-num_rows // batch_size)


def bucket_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index groups of similar length (for unpacked inference), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
