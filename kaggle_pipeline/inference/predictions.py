"""Examples -> predictions: label scoring for classification (never an invalid label), greedy
decoding in batches of similar length for generation. Sizes and settings come as arguments."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from kaggle_pipeline.cli import log
from kaggle_pipeline.data.chat_template import encode_prompt
from kaggle_pipeline.data.packing import bucket_by_length
from kaggle_pipeline.data.tasks import Example, TaskSpec
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.inference.label_scoring import score_labels
from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig
from kaggle_pipeline.model import Transformer

# Generation budget: long enough for a Dolly answer or a summary, short enough that a model which
# never closes its turn cannot stall a run.
MAX_NEW_TOKENS = 256


def classify(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: Sequence[Example], *, seq_len: int, batch_size: int) -> np.ndarray:
    """[n, num_labels] label scores (log-probabilities of each label's words)."""
    words = list(spec.label_map.values())
    return score_labels(model, variables, tokenizer, [e.prompt for e in examples], words,
                        style=spec.style, seq_len=seq_len, batch_size=batch_size)


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
def _sampler(model: Transformer, stops: tuple[int, ...]) -> Sampler:
    # One sampler per model, so validation and test share its compiled decode loop.
    return Sampler(model, stop_ids=stops)


def generate(model: Transformer, variables: dict, tokenizer: Tokenizer, spec: TaskSpec,
             examples: Sequence[Example], *, max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 8) -> list[str]:
    """The greedy answer to each example's prompt, in the examples' order.

    Prompts are batched by length (less padding); every batch is filled up to `batch_size`
    with copies of its first prompt so all batches share one compiled shape per length bucket.
    """
    if not examples:
        return []
    prompts = [encode_prompt(tokenizer, e.prompt, spec.style).tolist() for e in examples]
    sampler = _sampler(model, stop_ids(tokenizer))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    outputs: list[str] = [""] * len(prompts)
    groups = bucket_by_length([len(p) for p in prompts], batch_size)
    for number, group in enumerate(groups, start=1):
        batch = [prompts[i] for i in group]
        batch += [batch[0]] * (batch_size - len(batch))
        for i, ids in zip(group, sampler.generate(variables, batch, sampling), strict=False):
            outputs[i] = tokenizer.decode(ids).strip()
        if number % 10 == 0 or number == len(groups):
            log(f"generated {min(number * batch_size, len(prompts))}/{len(prompts)}")
    return outputs
