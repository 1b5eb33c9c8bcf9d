"""Classification by label scoring: log p(label words | prompt) for every label, no free
generation, so a prediction is always a valid label. Labels of several tokens are scored in full.

A prompt is computed once for all its labels: its example is the prompt, then each label's
tokens as a branch that sees the prompt and itself only (`transformer.causal_segment_mask`),
each branch at the positions right after the prompt. Two labels cost one prompt, not two.

Memory stays bounded whatever the rows hold: a prompt longer than `max_prompt_len` tokens loses
its middle (the label part is never cut), and examples are scored in length buckets (rows of
seq_len, 2·seq_len, 4·seq_len, ... tokens) with fewer rows per batch as the rows get longer, so
a batch holds about `batch_size x seq_len` tokens. One 6,000-token review no longer pads every
other row to its length.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from kaggle_pipeline.cli import progress
from kaggle_pipeline.data.chat_template import Turn, encode_conversation
from kaggle_pipeline.data.packing import batches, pack
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.inference import placement
from kaggle_pipeline.inference.prompts import truncate_middle
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row, target_logprobs

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_src", "loss_valid", "branch_ids",
              "loss_tgt")


class LabelScores(NamedTuple):
    scores: np.ndarray  # [num_prompts, num_labels] total log-probability of each label's tokens
    truncated: int  # prompts cut to max_prompt_len


def answer_only(targets: np.ndarray) -> np.ndarray:
    """Drop the closing token (<end_of_turn> / eos) from a single answer's targets: what is
    left is the label's own tokens."""
    targets = targets.copy()
    last = np.nonzero(targets)[0]
    if len(last):
        targets[last[-1]] = False
    return targets


def encode_with_answer(tokenizer: Tokenizer, prompt: Sequence[Turn], answer: str, style: str,
                       label_only: bool) -> tuple[np.ndarray, np.ndarray]:
    enc = encode_conversation(tokenizer, [*prompt, Turn("model", answer)], style=style)
    targets = answer_only(enc.target_mask) if label_only else enc.target_mask
    return enc.ids, targets


def cut_prompt(ids: np.ndarray, targets: np.ndarray, max_prompt_len: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The part before the first target token (the prompt, the model turn's header) cut in its
    middle to at most max_prompt_len tokens; the targets and what follows them stay whole."""
    first = int(np.argmax(targets)) if targets.any() else len(ids)
    if first <= max_prompt_len:
        return ids, targets
    head = np.asarray(truncate_middle(ids[:first].tolist(), max_prompt_len), ids.dtype)
    return (np.concatenate([head, ids[first:]]),
            np.concatenate([np.zeros(len(head), bool), targets[first:]]))


def bucket_width(length: int, seq_len: int, longest: int) -> int:
    """Row length for an example of `length` tokens: seq_len doubled until it fits, but never
    past the longest example rounded up to 64 (so a 2,050-token maximum does not pad to 4,096)."""
    width = seq_len
    while width < length:
        width *= 2
    return min(width, max(seq_len, -(-longest // 64) * 64))


def branched_example(cut: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple | None:
    """One prompt's (ids, targets) per label -> one example: the prompt, then each label's
    target tokens as branch 1, 2, ... (the per-token arrays `packing.pack` takes), or None when
    the labels' prompts differ (then each label is scored as its own example)."""
    firsts = [int(np.argmax(targets)) for _, targets in cut]
    prompt = cut[0][0][:firsts[0]]
    if any(not targets.any() or not np.array_equal(ids[:first], prompt)
           for (ids, targets), first in zip(cut, firsts, strict=True)):
        return None
    n = len(prompt)
    ids, positions, branch_ids, sources = ([prompt], [np.arange(n)], [np.zeros(n)],
                                           [np.arange(n) - 1])
    start = n
    for branch, ((label_ids, targets), first) in enumerate(zip(cut, firsts, strict=True), 1):
        label = label_ids[first:first + int(targets[first:].sum())]
        k = len(label)
        ids.append(label)
        positions.append(n + np.arange(k))
        branch_ids.append(np.full(k, branch))
        sources.append(np.concatenate([[n - 1], start + np.arange(k - 1)]))
        start += k
    ids = np.concatenate(ids).astype(np.int32)
    targets = np.arange(len(ids)) >= n
    return ids, targets, {"positions": np.concatenate(positions).astype(np.int32),
                          "branch_ids": np.concatenate(branch_ids).astype(np.int32),
                          "sources": np.concatenate(sources).astype(np.int32)}


@functools.lru_cache(maxsize=8)
def _compiled_logprobs(model: Transformer):
    return jax.jit(functools.partial(target_logprobs, model))


def score_labels(model: Transformer, variables: dict, tokenizer: Tokenizer,
                 prompts: Sequence[Sequence[Turn]], label_words: Sequence[str], *,
                 style: str = "chat", seq_len: int = 256, batch_size: int = 8,
                 max_prompt_len: int = 2048, mesh: Mesh | None = None,
                 desc: str = "scoring") -> LabelScores:
    """Every label's total log-probability after every prompt, and how many prompts were cut.

    A batch holds about batch_size x seq_len tokens (fewer rows when they are longer). On a
    `mesh` the weights are placed by the sharding rules and the rows split over data and fsdp.
    """
    items, cut = [], 0
    scores_of = []  # per item, the flat (prompt, label) index of each branch (or its one label)
    for p, prompt in enumerate(prompts):
        per_label, was_cut = [], False
        for word in label_words:
            ids, targets = encode_with_answer(tokenizer, prompt, word, style, label_only=True)
            per_label.append(cut_prompt(ids, targets, max_prompt_len))
            was_cut |= len(per_label[-1][0]) < len(ids)
        cut += was_cut
        example = branched_example(per_label) if len(label_words) > 1 else None
        flat = [p * len(label_words) + j for j in range(len(label_words))]
        if example is not None:
            items.append(example)
            scores_of.append(flat)
        else:
            items.extend(per_label)
            scores_of.extend([f] for f in flat)
    longest = max(len(item[0]) for item in items)
    buckets: dict[int, list[int]] = {}
    for index, (ids, *_) in enumerate(items):
        buckets.setdefault(bucket_width(len(ids), seq_len, longest), []).append(index)
    if mesh is not None:
        variables = placement.place_variables(variables, mesh, model.config)
    logprobs = _compiled_logprobs(model)
    totals = np.zeros(len(prompts) * len(label_words))
    bar = progress(len(prompts), desc, unit="prompts")
    done_items, real_tokens, started = 0, 0, time.perf_counter()
    for width in sorted(buckets, reverse=True):  # longest first: the peak memory comes early
        members = buckets[width]
        rows, stats = pack([items[i] for i in members], width)
        if stats.truncated or stats.dropped:
            raise ValueError(f"label scoring lost examples: {stats.summary()}")
        # A coarse bound on targets per row, so validation and test reuse one compiled program.
        slots = max_targets_per_row(rows, multiple=16)
        rows_per_batch = max(1, batch_size * seq_len // width)
        for batch in batches(rows, rows_per_batch, seed=0, epoch=0, shuffle=False):
            batch = add_target_slots(batch, slots)
            inputs = {k: batch[k] for k in BATCH_KEYS if k in batch}
            if mesh is not None:
                inputs = dict(zip(inputs, placement.place_batch(list(inputs.values()), mesh),
                                  strict=True))
            lp = np.asarray(logprobs(variables, inputs))
            tgt = batch["loss_tgt"] if "loss_tgt" in batch else batch["loss_src"] + 1
            valid = batch["loss_valid"]
            owner = np.asarray(members)[np.take_along_axis(batch["example_index"], tgt,
                                                           axis=1)[valid]]
            branch = (np.take_along_axis(batch["branch_ids"], tgt, axis=1)[valid]
                      if "branch_ids" in batch else np.zeros(len(owner), np.int32))
            flat = [scores_of[o][max(b - 1, 0)] for o, b in zip(owner, branch, strict=True)]
            np.add.at(totals, flat, lp[valid])
            in_batch = np.unique(batch["example_index"][batch["example_index"] >= 0])
            done_items += sum(len(scores_of[members[i]]) for i in in_batch)
            real_tokens += int((batch["segment_ids"] > 0).sum())
            bar.set_postfix(tok_s=f"{real_tokens / (time.perf_counter() - started):.0f}")
            bar.update(done_items // len(label_words) - bar.n)
    bar.close()
    return LabelScores(totals.reshape(len(prompts), len(label_words)), cut)
