"""Examples -> predictions: label scoring for classification (never an invalid label), batched
decoding of prompts sorted by length for generation. Sizes and settings come as arguments."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

from kaggle_pipeline.cli import log, progress
from kaggle_pipeline.data.chat_template import encode_prompt
from kaggle_pipeline.data.tasks import Example, TaskSpec
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.inference.label_scoring import LabelScores, score_labels
from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig, generate_many
from kaggle_pipeline.model import Transformer

# Generation budget: long enough for a Dolly answer or a summary, short enough that a model which
# never closes its turn cannot stall a run.
MAX_NEW_TOKENS = 256
# Prompt tokens kept for scoring and generation (data.max_prompt_len): longer prompts lose their
# middle. A 2,048-token row scores in well under 1 GB of activations on the 270M model.
MAX_PROMPT_LEN = 2048
# Rows x (prompt + new tokens) of one generation batch: 32 short prompts with 256 new tokens.
TOKEN_BUDGET = 16384
MAX_BATCH = 32


class Answers(NamedTuple):
    texts: list[str]  # the generated answer of each example, in the examples' order
    truncated: int  # prompts cut to max_prompt_len


def classify(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: Sequence[Example], *, seq_len: int, batch_size: int,
             max_prompt_len: int = MAX_PROMPT_LEN, mesh: Mesh | None = None) -> LabelScores:
    """[n, num_labels] label scores (log-probabilities of each label's words) and how many
    prompts were cut."""
    words = list(spec.label_map.values())
    result = score_labels(model, variables, tokenizer, [e.prompt for e in examples], words,
                          style=spec.style, seq_len=seq_len, batch_size=batch_size,
                          max_prompt_len=max_prompt_len, mesh=mesh)
    _log_truncated(result.truncated, len(examples), max_prompt_len)
    return result


def decide(scores: np.ndarray, labels: list, threshold: float = 0.0) -> list:
    """Binary: positive when margin = score[0] - score[1] exceeds the calibrated threshold
    (label order is the label map's); otherwise the best-scoring label."""
    if len(labels) == 2:
        return [labels[0] if m > threshold else labels[1] for m in scores[:, 0] - scores[:, 1]]
    return [labels[i] for i in scores.argmax(axis=1)]


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """<end_of_turn> closes a chat answer, <eos> a plain one."""
    return (tokenizer.end_of_turn_id, tokenizer.eos_id)


@functools.lru_cache(maxsize=8)
def _sampler(model: Transformer, stops: tuple[int, ...], mesh: Mesh | None) -> Sampler:
    # One sampler per model, so validation and test share its compiled decode loops.
    return Sampler(model, stop_ids=stops, mesh=mesh)


def generate(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: Sequence[Example], *, max_new_tokens: int = MAX_NEW_TOKENS,
             sampling: SamplingConfig | None = None, max_prompt_len: int = MAX_PROMPT_LEN,
             token_budget: int = TOKEN_BUDGET, max_batch: int = MAX_BATCH,
             mesh: Mesh | None = None, seed: int = 0) -> Answers:
    """The answer to each example's prompt, in the examples' order: greedy with
    `max_new_tokens`, or as `sampling` says (its max_new_tokens then counts). Prompts are
    decoded longest first in batches that `token_budget` bounds (sampler.generate_many)."""
    if not examples:
        return Answers([], 0)
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    prompts = [encode_prompt(tokenizer, e.prompt, spec.style).tolist() for e in examples]
    sampler = _sampler(model, stop_ids(tokenizer), mesh)
    bar = progress(len(prompts), "generating", unit="prompts")
    generated, started = 0, time.perf_counter()

    def on_batch(prompts_done: int, tokens: int) -> None:
        nonlocal generated
        generated += tokens
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.1f}")
        bar.update(prompts_done)

    try:
        result = generate_many(sampler, variables, prompts, sampling,
                               max_prompt_len=max_prompt_len, token_budget=token_budget,
                               max_batch=max_batch, seed=seed, on_batch=on_batch)
    finally:
        bar.close()
    _log_truncated(result.truncated, len(examples), max_prompt_len)
    return Answers([tokenizer.decode(ids).strip() for ids in result.tokens], result.truncated)


def _log_truncated(truncated: int, total: int, max_prompt_len: int) -> None:
    if truncated:
        log(f"{truncated} of {total} prompts were longer than {max_prompt_len} tokens and lost "
            "their middle (data.max_prompt_len)")
