"""Gemma conversations as text and as token ids with a loss mask.

Two styles:

* "chat", Gemma's instruction-tuned format (the official chat template, texts trimmed as it does):

      <bos><start_of_turn>user
      {user}<end_of_turn>
      <start_of_turn>model
      {model}<end_of_turn>

* "plain", for base models, a single exchange closed by eos:

      <bos>Instruction:
      {user}

      Response:
      {model}<eos>

A conversation may open with a "system" turn. Gemma has no system role: as the official Gemma 3
template does, its text and a blank line ("\n\n") go before the first user turn's text.

A conversation is a list of segments (markers, headers, turn texts), each flagged as target or
not. `render_*` join them into a string. `encode_conversation` puts the markers (bos, eos,
`<start_of_turn>`, `<end_of_turn>`) in by id and tokenizes the text between them in runs of
equal flag, so the mask is exact. Runs meet only at pieces SentencePiece never merges across
(markers, and the user-defined `\\n` that ends a `model\\n` header) and texts are trimmed, so the
ids equal those of tokenizing the rendered string as a whole (tests/test_chat_template.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from kaggle_pipeline.data.tokenizer import Tokenizer

Role = Literal["system", "user", "model"]
Style = Literal["chat", "plain"]

BOS, EOS = "<bos>", "<eos>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
PLAIN_INSTRUCTION, PLAIN_RESPONSE = "Instruction:\n", "\n\nResponse:\n"


@dataclasses.dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    ids: np.ndarray  # int32 [num_tokens]
    target_mask: np.ndarray  # bool [num_tokens]; True where the model must produce the token

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class _Segment:
    text: str
    is_target: bool = False
    is_marker: bool = False  # bos, eos, <start_of_turn>, <end_of_turn>: one token, put in by id


_MARK_BOS = _Segment(BOS, is_marker=True)
_MARK_START_OF_TURN = _Segment(START_OF_TURN, is_marker=True)


def render_chat(turns: Sequence[Turn], *, add_generation_prompt: bool = False) -> str:
    """The Gemma chat string; ends with `<start_of_turn>model\\n` if add_generation_prompt."""
    return _join(_chat_segments(turns, add_generation_prompt))


def render_plain(turns: Sequence[Turn], *, add_generation_prompt: bool = False) -> str:
    """The base-model string: one user turn, then the model turn (closed by eos) or, with
    add_generation_prompt, the `Response:` header to be completed."""
    return _join(_plain_segments(turns, add_generation_prompt))


def render(turns: Sequence[Turn], *, style: Style = "chat",
           add_generation_prompt: bool = False) -> str:
    return _join(_segments(turns, style, add_generation_prompt))


def encode_conversation(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    *,
    style: Style = "chat",
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Token ids of the conversation and the mask of the tokens to learn.

    Targets are the text of every model turn plus what closes it (`<end_of_turn>` in chat, eos in
    plain); never user text, headers, bos or the newline after `<end_of_turn>`.
    """
    # Markers go in by id, so this works whether or not the vocabulary matches them in text.
    markers = {
        BOS: tokenizer.bos_id,
        EOS: tokenizer.eos_id,
        START_OF_TURN: tokenizer.start_of_turn_id,
        END_OF_TURN: tokenizer.end_of_turn_id,
    }
    ids: list[int] = []
    target_mask: list[bool] = []
    for run in _runs(_segments(turns, style, add_generation_prompt)):
        run_ids = [markers[run.text]] if run.is_marker else tokenizer.encode(run.text)
        ids.extend(run_ids)
        target_mask.extend([run.is_target] * len(run_ids))
    return EncodedConversation(np.asarray(ids, np.int32), np.asarray(target_mask, bool))


def encode_prompt(tokenizer: Tokenizer, turns: Sequence[Turn], style: Style = "chat") -> np.ndarray:
    """int32 ids to generate from: the conversation so far (ending with a user turn), then the
    header the model's answer follows."""
    if not turns or turns[-1].role != "user":
        raise ValueError("a prompt must end with a user turn (field 'role' of the last turn)")
    return encode_conversation(tokenizer, turns, style=style, add_generation_prompt=True).ids


# -- segments -----------------------------------------------------------------------------------


def _segments(turns: Sequence[Turn], style: str, add_generation_prompt: bool) -> list[_Segment]:
    if style == "chat":
        return _chat_segments(turns, add_generation_prompt)
    if style == "plain":
        return _plain_segments(turns, add_generation_prompt)
    raise ValueError(f"unknown conversation style {style!r}; expected 'chat' or 'plain'")


def _fold_system(turns: Sequence[Turn]) -> tuple[str, Sequence[Turn]]:
    """(the text put before the first user turn's, the turns without the system turn)."""
    if turns and turns[0].role == "system":
        if not isinstance(turns[0].text, str):
            raise ValueError("turn 0: field 'text' of the system turn is not str")
        return turns[0].text + "\n\n", turns[1:]
    return "", turns


def _chat_segments(turns: Sequence[Turn], add_generation_prompt: bool) -> list[_Segment]:
    prefix, turns = _fold_system(turns)
    _check_alternating(turns)
    segments = [_MARK_BOS]
    for index, turn in enumerate(turns):
        is_model = turn.role == "model"
        segments += [
            _MARK_START_OF_TURN,
            _Segment(f"{turn.role}\n"),
            # Trimmed like the official template does; it also keeps the segment boundaries on
            # pieces that never merge with their neighbours (a leading "\n" would fuse with the
            # header's "\n" into the single piece "\n\n", straddling the mask boundary). The
            # system prefix is not: it joins the header in one non-target run anyway.
            _Segment((prefix if index == 0 else "") + turn.text.strip(), is_target=is_model),
            _Segment(END_OF_TURN, is_target=is_model, is_marker=True),
            _Segment("\n"),
        ]
    if add_generation_prompt:
        if turns and turns[-1].role == "model":
            raise ValueError(
                "add_generation_prompt after a model turn: the last turn must be 'user'"
            )
        segments += [_MARK_START_OF_TURN, _Segment("model\n")]
    return [segment for segment in segments if segment.text]


def _plain_segments(turns: Sequence[Turn], add_generation_prompt: bool) -> list[_Segment]:
    prefix, turns = _fold_system(turns)
    _check_alternating(turns)
    if len(turns) > 2:
        raise ValueError(
            f"the plain style holds one exchange (user, model), got {len(turns)} turns"
        )
    if add_generation_prompt and len(turns) != 1:
        raise ValueError("add_generation_prompt in the plain style needs exactly one user turn")
    segments = [_MARK_BOS, _Segment(PLAIN_INSTRUCTION), _Segment(prefix + turns[0].text.strip())]
    if len(turns) == 2 or add_generation_prompt:
        segments.append(_Segment(PLAIN_RESPONSE))
    if len(turns) == 2:
        segments += [
            _Segment(turns[1].text.strip(), is_target=True),
            _Segment(EOS, is_target=True, is_marker=True),
        ]
    return [segment for segment in segments if segment.text]


def _check_alternating(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for index, turn in enumerate(turns):
        if turn.role not in ("user", "model"):
            where = " (a system turn may only come first)" if turn.role == "system" else ""
            raise ValueError(
                f"turn {index}: field 'role' is {turn.role!r}; expected 'user' or 'model'{where}"
            )
        expected = "user" if index % 2 == 0 else "model"
        if turn.role != expected:
            raise ValueError(
                f"turn {index}: field 'role' is {turn.role!r} but turns must alternate "
                f"user/model starting with user, so {expected!r} was expected"
            )
        if not isinstance(turn.text, str):
            raise ValueError(f"turn {index}: field 'text' is {type(turn.text).__name__}, not str")


def _runs(segments: list[_Segment]) -> list[_Segment]:
    """Adjacent text segments with the same target flag, joined: token boundaries then fall only
    where the flag flips and at markers, where the whole rendered string has them too."""
    runs: list[_Segment] = []
    for segment in segments:
        previous = runs[-1] if runs else None
        if (previous is not None and previous.is_target == segment.is_target
                and not previous.is_marker and not segment.is_marker):
            runs[-1] = _Segment(previous.text + segment.text, segment.is_target)
        else:
            runs.append(segment)
    return runs


def _join(segments: list[_Segment]) -> str:
    return "".join(segment.text for segment in segments)
