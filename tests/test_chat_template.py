"""Gemma chat rendering and the target mask, with the real Gemma 3 270M tokenizer."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest

from kaggle_pipeline.data.chat_template import (
    Turn,
    encode_conversation,
    encode_prompt,
    render,
    render_chat,
    render_plain,
)
from kaggle_pipeline.data.tokenizer import Tokenizer

# The chat template of google/gemma-2-*-it (tokenizer_config.json), the reference for the format.
OFFICIAL_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# The system-prompt part of google/gemma-3-*-it's chat template: Gemma has no system role, the
# system text and a blank line go before the first user turn's (trimmed) text.
OFFICIAL_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CONVERSATION = [
    Turn("user", "이 식당 어때요? 솔직하게 알려주세요."),
    Turn("model", "ㄹㅇ 맛집이에요 ㅋㅋ 국밥 한 그릇에 9,000원 👌"),
    Turn("user", "  And parking?\n"),
    Turn("model", "No parking, but the subway exit 3 is a 5-minute walk.\n\n"),
    Turn("user", "고마워요!"),
    Turn("model", "천만에요. Enjoy your meal!"),
]


@pytest.fixture(scope="module")
def tok(gemma3_tokenizer) -> Tokenizer:
    return gemma3_tokenizer


def _official(turns: list[Turn], add_generation_prompt: bool = False,
              template: str = OFFICIAL_GEMMA_TEMPLATE) -> str:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    template = jinja2.Environment().from_string(template)
    messages = [{"role": "assistant" if t.role == "model" else t.role, "content": t.text}
                for t in turns]
    return template.render(messages=messages, bos_token="<bos>", raise_exception=raise_exception,
                           add_generation_prompt=add_generation_prompt)


def _target_runs(tok: Tokenizer, encoded) -> list[str]:
    """Decoded text of each maximal run of target tokens."""
    runs, current = [], []
    for token_id, is_target in zip(encoded.ids.tolist(), encoded.target_mask.tolist(), strict=True):
        if is_target:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def test_render_chat_exact_string():
    turns = [Turn("user", "Hi there"), Turn("model", "Hello!")]
    assert render_chat(turns) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    assert render_chat(turns[:1], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )


def test_render_chat_matches_the_official_template():
    for turns in (CONVERSATION, CONVERSATION[:1], CONVERSATION[:3], [Turn("user", "")]):
        assert render_chat(turns) == _official(turns)
        if turns[-1].role == "user":
            assert render_chat(turns, add_generation_prompt=True) == _official(turns, True)


def test_a_system_turn_goes_before_the_first_user_turn_as_gemma3_does(tok):
    system = Turn("system", "You are a helpful assistant. 답은 한 단어로.")
    for turns in ([system, *CONVERSATION], [system, CONVERSATION[0]], [system, *CONVERSATION[:3]]):
        assert render_chat(turns) == _official(turns, template=OFFICIAL_GEMMA3_TEMPLATE)
        if turns[-1].role == "user":
            assert render_chat(turns, add_generation_prompt=True) == _official(
                turns, True, OFFICIAL_GEMMA3_TEMPLATE)
        # Without a system turn the Gemma 3 template is the Gemma 2 one.
        assert _official(turns[1:], template=OFFICIAL_GEMMA3_TEMPLATE) == render_chat(turns[1:])
        encoded = encode_conversation(tok, turns)
        assert encoded.ids.tolist() == tok.encode(render_chat(turns))
        assert not encoded.target_mask[:len(encode_prompt(tok, turns[:2]))].any()
    plain = render_plain([system, Turn("user", "요약해 주세요"), Turn("model", "네.")])
    assert plain == ("<bos>Instruction:\nYou are a helpful assistant. 답은 한 단어로.\n\n"
                     "요약해 주세요\n\nResponse:\n네.<eos>")
    with pytest.raises(ValueError, match="a system turn may only come first"):
        render_chat([CONVERSATION[0], system])


def test_render_plain_exact_string():
    turns = [Turn("user", " 리뷰를 요약해 주세요 \n"), Turn("model", "맛있어요.")]
    assert render_plain(turns) == (
        "<bos>Instruction:\n리뷰를 요약해 주세요\n\nResponse:\n맛있어요.<eos>"
    )
    assert render_plain(turns[:1], add_generation_prompt=True) == (
        "<bos>Instruction:\n리뷰를 요약해 주세요\n\nResponse:\n"
    )
    assert render(turns, style="plain") == render_plain(turns)


def test_chat_target_mask_covers_exactly_the_model_turns(tok):
    encoded = encode_conversation(tok, CONVERSATION)
    assert encoded.ids.dtype == np.int32 and encoded.target_mask.dtype == np.bool_
    assert encoded.ids.shape == encoded.target_mask.shape
    assert encoded.ids[0] == tok.bos_id and not encoded.target_mask[0]

    model_texts = [t.text.strip() for t in CONVERSATION if t.role == "model"]
    assert _target_runs(tok, encoded) == [text + "<end_of_turn>" for text in model_texts]

    # Everything else is exactly the user turns and the headers.
    ids, mask = encoded.ids, encoded.target_mask
    context = tok.decode(np.where(mask, tok.pad_id, ids).tolist())  # pad decodes to nothing
    user_texts = [t.text.strip() for t in CONVERSATION if t.role == "user"]
    assert context == "".join(
        f"<start_of_turn>user\n{u}<end_of_turn>\n<start_of_turn>model\n\n" for u in user_texts
    )
    # The header right before each answer is not a target, its closing <end_of_turn> is.
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
    assert [tok.decode(ids[s - 3 : s]) for s in starts] == ["<start_of_turn>model\n"] * 3
    assert mask.sum() == sum(len(tok.encode(text)) + 1 for text in model_texts)


def test_segment_ids_equal_tokenizing_the_whole_string(tok):
    edge_cases = [
        [Turn("user", ""), Turn("model", "")],
        [Turn("user", "\n\n줄바꿈\n\n"), Turn("model", "   공백   ")],
        [Turn("user", "<start_of_turn> typed in text"), Turn("model", "ok <end_of_turn> too")],
        [Turn("user", "12345"), Turn("model", "67890")],
    ]
    for turns in [CONVERSATION, CONVERSATION[:2], *edge_cases]:
        encoded = encode_conversation(tok, turns)
        assert encoded.ids.tolist() == tok.encode(render_chat(turns)), turns
        plain = encode_conversation(tok, turns[:2], style="plain")
        assert plain.ids.tolist() == tok.encode(render_plain(turns[:2])), turns


def test_plain_target_mask_is_the_response_and_eos(tok):
    turns = [Turn("user", "다음 리뷰의 감성은?\n존맛 ㄹㅇ ㅋㅋ"), Turn("model", "긍정")]
    encoded = encode_conversation(tok, turns, style="plain")
    assert encoded.ids[0] == tok.bos_id and encoded.ids[-1] == tok.eos_id
    assert encoded.target_mask[-1]
    masked = encoded.ids[encoded.target_mask].tolist()
    assert masked == tok.encode("긍정") + [tok.eos_id]
    assert tok.decode(encoded.ids[~encoded.target_mask].tolist()) == (
        "Instruction:\n다음 리뷰의 감성은?\n존맛 ㄹㅇ ㅋㅋ\n\nResponse:\n"
    )


def test_encode_prompt_is_the_prefix_the_answer_follows(tok):
    for style, turns in (("chat", CONVERSATION), ("plain", CONVERSATION[:2])):
        prompt = encode_prompt(tok, turns[:-1], style)
        full = encode_conversation(tok, turns, style=style)
        assert prompt.dtype == np.int32
        assert full.ids[: len(prompt)].tolist() == prompt.tolist()
        # Earlier answers are targets; the header that ends the prompt is not, the next token is.
        earlier = encode_conversation(tok, turns[:-1], style=style).target_mask
        assert full.target_mask[: len(earlier)].tolist() == earlier.tolist()
        assert not full.target_mask[len(earlier) : len(prompt)].any()
        assert full.target_mask[len(prompt)]
    chat_prompt = encode_prompt(tok, CONVERSATION[:1])
    rendered = render_chat(CONVERSATION[:1], add_generation_prompt=True)
    assert chat_prompt.tolist() == tok.encode(rendered)
    assert chat_prompt[-3:].tolist() == [tok.start_of_turn_id, *tok.encode("model\n")]


def test_bad_conversations_are_rejected_with_the_field():
    with pytest.raises(ValueError, match=r"turn 0: field 'role' is 'assistant'"):
        render_chat([Turn("assistant", "hi")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"turn 1: field 'role' is 'user'.*alternate"):
        render_chat([Turn("user", "a"), Turn("user", "b")])
    with pytest.raises(ValueError, match="at least one turn"):
        render_chat([])
    with pytest.raises(ValueError, match="one exchange"):
        render_plain(CONVERSATION[:3])
    with pytest.raises(ValueError, match="last turn must be 'user'"):
        render_chat(CONVERSATION[:2], add_generation_prompt=True)
    with pytest.raises(ValueError, match="must end with a user turn"):
        encode_prompt(None, CONVERSATION[:2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown conversation style 'alpaca'"):
        render(CONVERSATION[:2], style="alpaca")  # type: ignore[arg-type]
