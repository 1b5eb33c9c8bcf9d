"""Classification by label scoring: log p(label words | prompt) for every label, no free
generation, so a prediction is always a valid label. Labels of several tokens are scored in full.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from kaggle_pipeline.data.chat_template import Turn, encode_conversation
from kaggle_pipeline.data.packing import batches, pack
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row, target_logprobs


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


@functools.lru_cache(maxsize=8)
def _compiled_logprobs(model: Transformer):
    return jax.jit(functools.partial(target_logprobs, model))


def score_labels(model: Transformer, variables: dict, tokenizer: Tokenizer,
                 prompts: Sequence[Sequence[Turn]], label_words: Sequence[str], *,
                 style: str = "chat", seq_len: int = 256, batch_size: int = 8) -> np.ndarray:
    """[num_prompts, num_labels] total log-probability of each label's tokens."""
    items = []
    for prompt in prompts:
        for word in label_words:
            items.append(encode_with_answer(tokenizer, prompt, word, style, label_only=True))
    longest = max(len(ids) for ids, _ in items)
    rows, stats = pack(items, max(seq_len, longest))
    if stats.truncated or stats.dropped:
        raise ValueError(f"label scoring lost examples: {stats.summary()}")
    # A coarse bound on targets per row, so validation and test reuse one compiled program.
    width = max_targets_per_row(rows, multiple=16)
    logprobs = _compiled_logprobs(model)
    totals = np.zeros(len(items))
    for batch in batches(rows, batch_size, seed=0, epoch=0, shuffle=False):
        batch = add_target_slots(batch, width)
        inputs = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "loss_src",
                                        "loss_valid")}
        lp = np.asarray(logprobs(variables, inputs))
        owner = np.take_along_axis(batch["example_index"], batch["loss_src"] + 1, axis=1)
        np.add.at(totals, owner[batch["loss_valid"]], lp[batch["loss_valid"]])
    return totals.reshape(len(prompts), len(label_words))
