"""Prompt length limits for inference: a prompt longer than the configured maximum loses its
middle, so the chat template's opening and the end of the prompt (the question, the model turn's
header) stay, and scoring and generation memory stay bounded whatever a test row holds."""

from __future__ import annotations

from collections.abc import Sequence

# Tokens kept from a cut prompt's start: <bos>, the user turn's header and the task's lead-in.
HEAD_TOKENS = 32


def truncate_middle(ids: Sequence[int], max_len: int) -> list[int]:
    """`ids` unchanged when at most max_len long; else its first min(HEAD_TOKENS, max_len // 4)
    tokens and its last ones, max_len in all."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    head = min(HEAD_TOKENS, max_len // 4)
    return ids[:head] + ids[len(ids) - (max_len - head):]
