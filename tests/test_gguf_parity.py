"""The real Gemma 3 270M GGUF: our loader + model against transformers on the same file."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig
from kaggle_pipeline.model import Transformer
from kaggle_pipeline.model.config import AttentionKind

ENGLISH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within a few decades, "
    "printers in Venice, Paris and London were producing books faster and more cheaply than any "
    "scribe could copy them, and literacy spread across Europe. Scientists shared their results "
    "in journals, and newspapers carried news of wars, markets and elections to people who had "
    "never before read a page of text. Governments soon learned to fear the pamphlet, and "
    "censors tried, mostly in vain, to control what could be printed and who could read it.")
KOREAN = (
    "한국어는 한반도와 그 주변 지역에서 쓰이는 언어로, 약 8천만 명이 사용한다. 한글은 1443년 "
    "세종대왕이 창제하였으며, 자음과 모음을 음절 단위로 모아 쓰는 독특한 문자 체계이다. 서울은 "
    "대한민국의 수도이자 가장 큰 도시로, 경제와 문화의 중심지 역할을 한다. 최근에는 한국의 음악, "
    "영화, 드라마가 세계적으로 큰 인기를 얻으면서 한국어를 배우려는 사람들도 빠르게 늘고 있다. "
    "봄에는 벚꽃 축제가 열리고, 가을에는 단풍을 보러 산에 오르는 사람들이 많다.")
PROMPTS = ("The capital of France is", "대한민국의 수도는")
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Single-token decoding is tiny matmuls: a second OpenMP thread only spin-waits (it doubled
    # the CPU time of generate on the 2-core machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference(hf_gemma3_270m):
    """transformers' tokenizer and dequantized f32 model of the same GGUF (conftest)."""
    return hf_gemma3_270m


@pytest.fixture(scope="module")
def ours(gemma3_270m):
    return gemma3_270m


def test_config_agrees_with_transformers(reference, ours):
    hf = reference[1].config
    config, _ = ours
    assert (config.vocab_size, config.embed_dim, config.hidden_dim, config.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert config.sliding_window == hf.sliding_window
    assert [k == AttentionKind.LOCAL for k in config.attention_kinds] == [
        t == "sliding_attention" for t in hf.layer_types]
    assert config.query_pre_attn_scalar == hf.query_pre_attn_scalar**-0.5
    assert config.local_rope_base == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert config.global_rope_base == hf.rope_parameters["full_attention"]["rope_theta"]


def test_logits_match_transformers_on_english_and_korean(reference, ours):
    tokenizer, hf_model = reference
    config, params = ours
    rows = [tokenizer(text)["input_ids"] for text in (ENGLISH, KOREAN)]
    length = max(map(len, rows))
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], segment_ids[i, :len(row)] = row, 1
    assert segment_ids.sum() >= 250

    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens).long(),
                       attention_mask=torch.from_numpy(segment_ids)).logits.numpy()
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    ours_logits, _ = jax.jit(Transformer(config).apply)(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
    real = segment_ids.astype(bool)
    ref, mine = ref[real], np.asarray(ours_logits)[real]
    del ours_logits

    # Same dequantized weights, both f32: only summation order differs (measured 1.1e-4 on
    # logits up to ~60, i.e. 2e-6 relative).
    max_abs_diff = float(np.max(np.abs(mine - ref)))
    assert max_abs_diff <= 1e-3
    # With every logit within d of the reference, the argmax can only move where the reference's
    # top two are closer than 2d: that is the near-tie allowance, nothing looser.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    disagree = mine.argmax(-1) != ref.argmax(-1)
    assert np.all(margin[disagree] <= 2 * max_abs_diff), margin[disagree]


def test_greedy_generation_matches_transformers(reference, ours):
    tokenizer, hf_model = reference
    config, params = ours
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = tokenizer.eos_token_id

    # One left-padded batch for transformers (its generate() expects left padding).
    length = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=attention_mask,
                                max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = []
    for new in out[:, length:].tolist():
        expected.append(new[:new.index(eos)] if eos in new else new)

    sampler = Sampler(Transformer(config), stop_ids=[eos], pad_multiple=8)
    got = sampler.generate({"params": params}, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert got == expected, [tokenizer.decode(t) for t in got + expected]
    assert all(len(tokens) == NEW_TOKENS for tokens in expected)  # no early stop hid the tail
