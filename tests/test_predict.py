"""Predictions on a tiny random Gemma 3 with the real 262k vocabulary and tokenizer: label
scoring against a direct full-forward computation, the batched sampler against a greedy
full-forward loop, generation submissions, and the predict CLI after a tiny training run."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from conftest import FIXTURES

from kaggle_pipeline import predict, run_setup, submission, train
from kaggle_pipeline.checkpoints import save_hf
from kaggle_pipeline.data.chat_template import Turn, encode_conversation, encode_prompt
from kaggle_pipeline.data.tasks import Example, build_examples, get_task, load_records
from kaggle_pipeline.data.tokenizer import Tokenizer
from kaggle_pipeline.evaluation import metrics, validation
from kaggle_pipeline.inference import label_scoring, predictions
from kaggle_pipeline.inference import sampler as sampler_module
from kaggle_pipeline.inference.label_scoring import score_labels
from kaggle_pipeline.inference.prompts import truncate_middle
from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig, generate_many
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.transformer import causal_segment_mask
from kaggle_pipeline.run_config import PROJECT_DIR, load_config
from kaggle_pipeline.submission import read_sample

CONFIG = tiny_config("gemma3", vocab_size=262_144)  # the "tiny-gemma3" preset
REVIEWS = ["국물이 진하고 면이 쫄깃해요 ㄹㅇ 맛집👍", "웨이팅 1시간 실화냐... 맛은 그냥 그럼",
           "사장님 친절하시고 가격도 착해요ㅋㅋ", "최악"]


def random_params(config, seed: int = 0) -> dict:
    """Random weights without flax's init (whose op-by-op compile takes seconds); std 0.3 makes
    the logits peaked enough that greedy choices are never near-ties."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                        abstract_params(config))


@pytest.fixture(scope="module")
def tokenizer(gemma3_tokenizer) -> Tokenizer:
    return gemma3_tokenizer


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(CONFIG)


@pytest.fixture(scope="module")
def variables() -> dict:
    return {"params": random_params(CONFIG)}


def prompts_of(texts):
    return [[Turn("user", f"리뷰: {text}")] for text in texts]


REFERENCE_LENGTH = 128  # every reference sequence is padded to this: one compilation
REFERENCE_POSITIONS = 16


@functools.lru_cache(maxsize=2)
def _reference_fns(model):
    def logits_at(variables, tokens, segment_ids, at):
        hidden, _ = model.apply(variables, tokens, jnp.arange(tokens.shape[1])[None],
                                segment_ids, return_hidden=True)
        return model.apply(variables, hidden[0, at], method=Transformer.unembed)

    return jax.jit(logits_at)


def full_logits(model, variables, ids, at) -> np.ndarray:
    """[len(at), V] logits at positions `at` of one plain forward pass over the whole sequence
    (no cache, no packing). Right padding keeps the shapes fixed; causal attention and segment
    id 0 keep the padding out of every real position. Only the asked positions are unembedded
    (a 262k-way matmul per position)."""
    assert len(ids) <= REFERENCE_LENGTH and len(at) <= REFERENCE_POSITIONS
    tokens = np.zeros((1, REFERENCE_LENGTH), np.int32)
    tokens[0, :len(ids)] = ids
    segment_ids = (np.arange(REFERENCE_LENGTH) < len(ids)).astype(np.int32)[None]
    where = np.zeros(REFERENCE_POSITIONS, np.int32)
    where[:len(at)] = at
    return np.asarray(_reference_fns(model)(variables, tokens, segment_ids, where))[:len(at)]


# ----------------------------------------------------------------------------- label scoring


def direct_label_logprobs(model, variables, tokenizer, prompt, word) -> list[float]:
    """log p(token | prompt, earlier tokens) for each of the word's tokens, from one unpacked
    full forward pass."""
    enc = encode_conversation(tokenizer, [*prompt, Turn("model", word)])
    start = len(encode_prompt(tokenizer, prompt))
    label = tokenizer.encode(word)
    assert enc.ids[start:start + len(label)].tolist() == label
    assert enc.ids[start + len(label)] == tokenizer.end_of_turn_id
    at = [start + j - 1 for j in range(len(label))]  # the positions that predict the label
    logp = jax.nn.log_softmax(full_logits(model, variables, enc.ids, at), axis=-1)
    return [float(logp[j, t]) for j, t in enumerate(label)]


def test_multi_token_label_scores_sum_all_their_tokens(model, variables, tokenizer):
    words = ["아주 맛있는 식당이에요", "별로", "그저 그런 편이었습니다"]
    prompts = prompts_of(REVIEWS[:3])
    scores = score_labels(model, variables, tokenizer, prompts, words, seq_len=128,
                          batch_size=4).scores
    lengths = set()
    for i, prompt in enumerate(prompts):
        for j, word in enumerate(words):
            per_token = direct_label_logprobs(model, variables, tokenizer, prompt, word)
            lengths.add(len(per_token))
            assert scores[i, j] == pytest.approx(sum(per_token), abs=2e-4), (i, word)
            if len(per_token) > 1:  # the later tokens matter: not just the first one's score
                assert abs(sum(per_token) - per_token[0]) > 1e-2
    assert max(lengths) >= 3  # several labels really are multi-token


def _record_scoring_inputs(monkeypatch) -> list[dict]:
    """The inputs of every call label scoring makes to its compiled function, in order."""
    calls = []
    compiled = label_scoring._compiled_logprobs

    def recording(model):
        fn = compiled(model)

        def call(variables, inputs):
            calls.append(inputs)
            return fn(variables, inputs)
        return call

    monkeypatch.setattr(label_scoring, "_compiled_logprobs", recording)
    return calls


def test_each_prompt_is_computed_once_for_all_its_labels(model, variables, tokenizer,
                                                         monkeypatch):
    """The labels branch off one copy of the prompt: the tokens computed are the prompts once
    plus every label's tokens (the scores themselves are checked against full forward passes
    above)."""
    words = ["긍정", "부정", "잘 모르겠음"]
    prompts = prompts_of(REVIEWS[:3])
    calls = _record_scoring_inputs(monkeypatch)
    score_labels(model, variables, tokenizer, prompts, words, seq_len=128, batch_size=4)
    computed = [int((np.asarray(inputs["segment_ids"]) > 0).sum()) for inputs in calls]
    prompt_tokens = label_tokens = per_label = 0
    for prompt in prompts:
        for word in words:
            ids, targets = label_scoring.encode_with_answer(tokenizer, prompt, word, "chat", True)
            per_label += int(np.argmax(targets)) + int(targets.sum())
            label_tokens += int(targets.sum())
        prompt_tokens += int(np.argmax(targets))
    assert sum(computed) == prompt_tokens + label_tokens < 0.5 * per_label


def test_a_label_branch_sees_the_prompt_and_itself_only():
    # one example: trunk of 3 tokens, branch 1 of 2 tokens, branch 2 of 1 token; then padding
    segments = jnp.asarray([[1, 1, 1, 1, 1, 1, 0]])
    branches = jnp.asarray([[0, 0, 0, 1, 1, 2, 0]])
    mask = np.asarray(causal_segment_mask(segments, branches))[0]
    assert mask[4].tolist() == [True, True, True, True, True, False, False]
    assert mask[5].tolist() == [True, True, True, False, False, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False, False]
    np.testing.assert_array_equal(np.asarray(causal_segment_mask(segments))[0][5],
                                  [True] * 6 + [False])  # without branches: plain causal
    # Labels whose prompts differ (not the case for chat prompts) are scored one by one.
    a = (np.array([5, 6, 7, 8]), np.array([False, False, True, False]))
    b = (np.array([5, 9, 7, 8]), np.array([False, False, True, False]))
    assert label_scoring.branched_example([a, b]) is None
    ids, targets, branches = label_scoring.branched_example([a, a])
    assert ids.tolist() == [5, 6, 7, 7] and targets.tolist() == [False, False, True, True]
    assert branches["positions"].tolist() == [0, 1, 2, 2]
    assert branches["sources"].tolist() == [-1, 0, 1, 1]


def test_batching_and_packing_order_do_not_change_scores(model, variables, tokenizer):
    words = ["긍정", "부정", "잘 모르겠음"]
    prompts = prompts_of(REVIEWS)
    one_per_batch = score_labels(model, variables, tokenizer, prompts, words, seq_len=32,
                                 batch_size=1).scores
    packed = score_labels(model, variables, tokenizer, prompts, words, seq_len=128,
                          batch_size=4).scores
    reversed_order = score_labels(model, variables, tokenizer, prompts[::-1], words,
                                  seq_len=128, batch_size=4).scores[::-1]
    assert np.abs(one_per_batch - packed).max() <= 1e-5
    assert np.abs(one_per_batch - reversed_order).max() <= 1e-5
    assert len(set(np.round(one_per_batch.ravel(), 3))) > 6  # real, distinct scores


def test_classification_prediction_is_always_a_valid_label(model, variables, tokenizer,
                                                           tmp_path):
    spec = get_task("tarr-sentiment")
    three = get_task("tarr-sentiment", label_map={2: "중립", 1: "긍정", 0: "부정"})
    frame = load_records(spec, FIXTURES / "tarr_train.tsv").frame
    cfg = load_config(None, ["data.batch_size=2", "data.seq_len=128"])
    for task in (spec, three):
        examples = build_examples(task, frame, with_answers=False)
        scores = predictions.classify(model, variables, tokenizer, task, examples,
                                      seq_len=cfg.data.seq_len,
                                      batch_size=cfg.data.batch_size * 2).scores
        labels = list(task.label_map)
        assert scores.shape == (len(examples), len(labels)) and np.isfinite(scores).all()
        decided = predictions.decide(scores, labels)
        assert set(decided) <= set(labels)
        if len(labels) == 2:
            margins = scores[:, 0] - scores[:, 1]
            assert decided == [1 if m > 0 else 0 for m in margins]
            assert predictions.decide(scores, labels, margins.max()) == [0] * len(examples)
            assert predictions.decide(scores, labels, margins.min() - 1) == [1] * len(examples)
        else:
            assert decided == [labels[i] for i in scores.argmax(axis=1)]


def test_truncate_middle_keeps_the_start_and_the_end():
    ids = list(range(1000))
    assert truncate_middle(ids, 1000) == ids
    cut = truncate_middle(ids, 100)
    assert len(cut) == 100 and cut[:25] == ids[:25] and cut[25:] == ids[-75:]
    assert truncate_middle(ids, 400)[:32] == ids[:32]  # at most HEAD_TOKENS from the start


def test_one_long_test_review_is_cut_and_scored_without_padding_the_others(
        model, variables, tokenizer, monkeypatch):
    # Issue 12: one 10,000-character review (6,001 tokens) padded every row to its length and
    # was OOM-killed. Now it loses its middle (data.max_prompt_len), it is counted, and the
    # other rows are scored in their own short bucket exactly as without it.
    words = ["긍정", "부정"]
    long_review = ("음식이 정말 맛있고 직원분들도 친절했어요. " * 500)[:10_000]
    prompts = prompts_of([REVIEWS[0], long_review, REVIEWS[1]])
    assert len(encode_prompt(tokenizer, prompts[1])) > 2000
    calls = _record_scoring_inputs(monkeypatch)
    result = score_labels(model, variables, tokenizer, prompts, words, seq_len=32, batch_size=4,
                          max_prompt_len=96)
    shapes = [inputs["tokens"].shape for inputs in calls]
    assert result.truncated == 1
    # Batches hold at most batch_size x seq_len tokens, and no row is longer than the cut prompt
    # plus its answer (rounded up to 64).
    assert max(b * t for b, t in shapes) <= 4 * 32 and max(t for _, t in shapes) <= 128
    short = score_labels(model, variables, tokenizer, [prompts[0], prompts[2]], words,
                         seq_len=32, batch_size=4, max_prompt_len=96)
    assert short.truncated == 0
    np.testing.assert_allclose(result.scores[[0, 2]], short.scores, atol=1e-5)
    # The long row is scored as its cut sequence: the first 24 prompt tokens, then the last 72.
    for j, word in enumerate(words):
        ids, targets = label_scoring.encode_with_answer(tokenizer, prompts[1], word, "chat",
                                                        label_only=True)
        first = int(np.argmax(targets))
        kept = ids[:24].tolist() + ids[first - 72:].tolist()
        at = [96 + k - 1 for k in range(int(targets.sum()))]
        logp = jax.nn.log_softmax(full_logits(model, variables, kept, at), axis=-1)
        expected = sum(float(logp[k, kept[96 + k]]) for k in range(len(at)))
        assert result.scores[1, j] == pytest.approx(expected, abs=2e-4)


def test_a_long_generation_prompt_loses_its_middle_and_is_counted(model, variables, tokenizer):
    prompts = [encode_prompt(tokenizer, p).tolist()
               for p in prompts_of([REVIEWS[0], REVIEWS[2] * 40])]
    assert len(prompts[1]) > 200
    sampler = Sampler(model, stop_ids=[tokenizer.end_of_turn_id, tokenizer.eos_id])
    sampling = SamplingConfig(max_new_tokens=5)
    got = generate_many(sampler, variables, prompts, sampling, max_prompt_len=64)
    assert got.truncated == 1
    assert got.tokens == sampler.generate(variables, [prompts[0], truncate_middle(prompts[1], 64)],
                                          sampling)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scoring_and_generation_run_in_the_models_precision(variables, tokenizer, dtype):
    model = Transformer(CONFIG, dtype=dtype)
    prompts = [encode_prompt(tokenizer, p).tolist() for p in prompts_of(REVIEWS[:2])]
    sampler = Sampler(model, stop_ids=[tokenizer.end_of_turn_id, tokenizer.eos_id])
    got = sampler.generate(variables, prompts, SamplingConfig(max_new_tokens=5))
    # The cache holds keys and values in the compute dtype; greedy tokens equal a full forward
    # pass in that dtype at every step.
    assert got == [greedy_full_forward(model, variables, p, 5) for p in prompts]
    words = ["긍정", "부정"]
    scores = score_labels(model, variables, tokenizer, prompts_of(REVIEWS[:2]), words,
                          seq_len=128, batch_size=4).scores
    reference = score_labels(Transformer(CONFIG), variables, tokenizer, prompts_of(REVIEWS[:2]),
                             words, seq_len=128, batch_size=4).scores
    # bf16 keeps 8 significant bits: scores of size ~30 agree to 2^-7 of their size (measured:
    # 0.09 of 34, a third of the bound).
    tolerance = 1e-5 if dtype == "float32" else 2**-7 * np.abs(reference).max()
    assert np.abs(scores - reference).max() <= tolerance


# ----------------------------------------------------------------------------- generation


def greedy_full_forward(model, variables, prompt: list[int], steps: int, stops=()) -> list[int]:
    """Reference decoding: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        token = int(np.argmax(full_logits(model, variables, ids, [len(ids) - 1])[0]))
        if token in stops:
            break
        out.append(token)
        ids.append(token)
    return out


def test_sampler_equals_a_greedy_full_forward_loop(model, variables, tokenizer):
    # Prompt lengths on both sides of the sliding window (8) and of the 32-token padding.
    prompts = [encode_prompt(tokenizer, p).tolist()
               for p in prompts_of(["맛집", REVIEWS[1], REVIEWS[0] * 3])]
    assert len({len(p) for p in prompts}) == 3 and max(len(p) for p in prompts) > 32
    steps = 8
    expected = [greedy_full_forward(model, variables, p, steps) for p in prompts]
    sampler = Sampler(model, stop_ids=[tokenizer.end_of_turn_id, tokenizer.eos_id])
    got = sampler.generate(variables, prompts, SamplingConfig(max_new_tokens=steps))
    assert got == expected
    # A stop token ends a sequence where the reference first reaches it, and is not returned.
    row, at = next((i, k) for i, seq in enumerate(expected) for k in range(2, steps)
                   if seq[k] not in seq[:k])
    stop = expected[row][at]
    stopped = Sampler(model, stop_ids=[stop]).generate(variables, prompts,
                                                       SamplingConfig(max_new_tokens=steps))
    assert stopped[row] == expected[row][:at]
    for seq, got_seq in zip(expected, stopped, strict=True):
        assert got_seq == (seq[:seq.index(stop)] if stop in seq else seq)


def test_finished_rows_leave_the_batch_and_the_rest_decode_unchanged(model, variables,
                                                                     tokenizer, monkeypatch):
    # One long answer must not keep a batch of finished rows computing: every chunk_steps steps
    # the rows still going move to a smaller batch (their cache rows gathered), and their
    # tokens stay those of the greedy full-forward loop.
    prompts = [encode_prompt(tokenizer, p).tolist() for p in prompts_of(REVIEWS)]
    steps = 9
    expected = [greedy_full_forward(model, variables, p, steps) for p in prompts]
    # Stop tokens that end the first three rows early, none of which the last row produces.
    stops = {seq[k] for seq, k in zip(expected[:3], (1, 2, 3), strict=True)}
    assert not stops & set(expected[3])
    sizes = []
    take = sampler_module._take_rows

    def recording(state, rows):
        sizes.append(len(rows))
        return take(state, rows)

    monkeypatch.setattr(sampler_module, "_take_rows", recording)
    sampler = Sampler(model, stop_ids=sorted(stops), chunk_steps=2)
    got = sampler.generate(variables, prompts, SamplingConfig(max_new_tokens=steps))
    cut = [next((seq[:k] for k, t in enumerate(seq) if t in stops), seq) for seq in expected]
    assert got == cut
    assert sizes and sizes[-1] == 1  # the batch shrank to the one row still going


def translation_config(tmp_path, test: Path | str, task="aihub-parallel", *extra):
    return load_config(None, [f"data.task={task}", f"data.test={test}", "data.batch_size=2",
                              f"output.dir={tmp_path / 'runs'}", "output.name=t",
                              f"output.submissions={tmp_path / 'submissions'}",
                              "task.max_new_tokens=6", *extra])


def test_generation_submission_has_every_test_id_once(model, variables, tokenizer, tmp_path):
    cfg = translation_config(tmp_path, FIXTURES / "aihub_parallel_ko_en.csv")
    spec = run_setup.task_spec(cfg)
    path = predict.predict_test(model, variables, tokenizer, spec, cfg)
    assert path.parent == tmp_path / "submissions" and path.suffix == ".csv"
    frame = read_sample(path)
    assert frame.columns == ["id", "en"]
    assert frame["id"].to_list() == ["1", "2", "3"]  # every row of the file, once, in order
    assert all(text.strip() for text in frame["en"].to_list())



def test_dolly_submission_reads_the_file_pair(model, variables, tokenizer, tmp_path,
                                              monkeypatch):
    # The Dolly reader takes the (English, Korean) pair; ids are <record>-<field>. The answers
    # are canned (decoding is tested above): each one names its prompt.
    monkeypatch.setattr(predict, "generate", lambda model, variables, tokenizer, spec,
                        examples, **kw: predictions.Answers(
                            [f"번역 {e.prompt[0].text[-12:]}" for e in examples], 0))
    pair = f"{FIXTURES / 'dolly_en.jsonl'},{FIXTURES / 'dolly_ko.jsonl'}"
    cfg = translation_config(tmp_path, pair, "dolly-en-ko")
    spec = run_setup.task_spec(cfg)
    records = load_records(spec, run_setup.input_paths(spec, cfg.data.test)).frame
    path = predict.predict_test(model, variables, tokenizer, spec, cfg)
    frame = read_sample(path)
    assert frame.columns == ["id", "ko"]
    assert frame["id"].to_list() == records["id"].to_list()
    assert len(set(frame["id"].to_list())) == len(frame) == len(records) > 3
    english = dict(zip(records["id"].to_list(), records["en"].to_list(), strict=True))
    for key, answer in zip(frame["id"].to_list(), frame["ko"].to_list(), strict=True):
        assert answer == f"번역 {english[key].strip()[-12:]}"  # each answer under its own id


def test_generation_answers_follow_the_examples_order(model, variables, tokenizer):
    spec = get_task("aihub-parallel")
    examples = [Example(str(i), [Turn("user", text)]) for i, text in enumerate(REVIEWS)]
    batched = predictions.generate(model, variables, tokenizer, spec, examples, max_new_tokens=6,
                                   max_batch=2).texts
    for example, text in zip(examples, batched, strict=True):
        prompt = encode_prompt(tokenizer, example.prompt).tolist()
        ids = greedy_full_forward(model, variables, prompt, 6,
                                  stops={tokenizer.end_of_turn_id, tokenizer.eos_id})
        assert text == tokenizer.decode(ids).strip()


def test_validate_generation_scores_and_writes_the_validation_answers(model, variables,
                                                                    tokenizer, tmp_path):
    cfg = translation_config(tmp_path, FIXTURES / "aihub_parallel_ko_en.csv")
    spec = run_setup.task_spec(cfg)
    frame = load_records(spec, FIXTURES / "aihub_parallel_ko_en.csv").frame
    examples = build_examples(spec, frame)
    result = predict.validate_generation(model, variables, tokenizer, spec, examples[:2], cfg)
    written = read_sample(Path(result["predictions_file"]))
    assert Path(result["predictions_file"]) == cfg.run_dir / validation.VALIDATION_FILE
    assert written.columns == ["id", "prediction", "reference"]
    assert written["id"].to_list() == ["1", "2"]
    assert written["reference"].to_list() == frame["en"].to_list()[:2]
    hyps = written["prediction"].fill_null("").to_list()
    assert hyps == predictions.generate(model, variables, tokenizer, spec, examples[:2],
                                        max_new_tokens=6).texts
    expected = metrics.generation_scores(hyps, written["reference"].to_list(),
                                         expected_script="latin")
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["n"] == 2 and "tok:char" in result["bleu_signature"]


def test_test_prompts_that_were_validated_are_not_decoded_again(model, variables, tokenizer,
                                                                tmp_path, monkeypatch, capsys):
    """A test file that holds validation prompts (the emoji config validates on its test file):
    evaluate_and_submit decodes each prompt once and the submission carries the validation
    answers."""
    file = FIXTURES / "aihub_parallel_ko_en.csv"
    cfg = translation_config(tmp_path, file)
    spec = run_setup.task_spec(cfg)
    examples = build_examples(spec, load_records(spec, file).frame)
    decoded = []
    real = predict.generate

    def recording(model, variables, tokenizer, spec, examples, **kw):
        decoded.append([e.id for e in examples])
        return real(model, variables, tokenizer, spec, examples, **kw)

    monkeypatch.setattr(predict, "generate", recording)
    test = run_setup.read_test(cfg, spec)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # for the report
    out = predict.evaluate_and_submit(cfg, spec, model, variables, tokenizer, examples[:2],
                                      test_examples=test)
    assert decoded == [["1", "2"], ["3"]]  # the third test row alone was new
    assert "2 of 3 prompts were answered already (validation)" in capsys.readouterr().out
    validated = read_sample(Path(out["validation"]["predictions_file"]))
    submitted = read_sample(Path(out["submission"]))
    assert submitted["en"].to_list()[:2] == validated["prediction"].fill_null("").to_list()
    assert submitted["en"].to_list() == real(model, variables, tokenizer, spec, test,
                                             max_new_tokens=6).texts


def test_input_paths_errors_name_the_field():
    with pytest.raises(ValueError, match="data.train: task 'dolly-en-ko' reads two files"):
        run_setup.input_paths(get_task("dolly-en-ko"), "only_english.jsonl", "data.train")
    # A blind test set is the source language's file alone.
    assert run_setup.input_paths(get_task("dolly-en-ko"), "en.jsonl", "data.test").name == \
        "en.jsonl"
    with pytest.raises(ValueError, match="data.train: task 'tarr-sentiment' reads one file"):
        run_setup.input_paths(get_task("tarr-sentiment"), ["a.tsv", "b.tsv"], "data.train")


# ----------------------------------------------------------------------------- predict CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A Hugging Face-format tiny Gemma 3 and its tokenizer.model, as a user would have them."""
    root = tmp_path_factory.mktemp("ckpt")
    save_hf(random_params(CONFIG, seed=1), CONFIG, root / "model", dtype=jnp.float32)
    tokenizer.save(root / "model" / "tokenizer.model")
    return root / "model"


def _head(source: Path, out: Path, rows: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return out


def test_predict_cli_after_training_writes_the_sample_format(tiny_checkpoint, tmp_path, capsys):
    data = PROJECT_DIR / "data" / "tarr"
    train_file = _head(data / "train.tsv", tmp_path / "train.tsv", 12)
    test_file = _head(data / "test.tsv", tmp_path / "test.tsv", 5)
    args = [f"model.checkpoint={tiny_checkpoint}", "data.seq_len=128", "data.batch_size=2",
            f"data.train={train_file}", f"data.test={test_file}", "train.max_steps=2",
            "train.predict=false", f"output.dir={tmp_path / 'runs'}", "output.name=tiny",
            f"output.submissions={tmp_path / 'submissions'}"]
    assert train.main(args) == 0
    assert (tmp_path / "runs" / "tiny" / "adapter" / "lora_config.json").is_file()
    assert not (tmp_path / "submissions").exists()

    assert predict.main(args) == 0
    (written,) = (tmp_path / "submissions").iterdir()
    # Named after the run (output.name), and recorded in the run's summary.json.
    assert re.fullmatch(r"tiny-\d{8}-\d{6}\.tsv", written.name)
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["submission"] == str(written) and summary["submissions"] == [str(written)]
    test_lines = test_file.read_text(encoding="utf-8").splitlines()
    lines = written.read_text(encoding="utf-8").splitlines()
    assert lines[0] == test_lines[0] + "\tlabel"
    assert len(lines) == len(test_lines)
    for line, original in zip(lines[1:], test_lines[1:], strict=True):
        kept, _, label = line.rpartition("\t")
        assert kept == original and label in ("0", "1")

    # Prediction may batch differently; it may not ask the trained model another question.
    capsys.readouterr()
    assert predict.main([*args, "data.batch_size=1"]) == 0
    assert predict.main([*args, "data.prompt=평가: {comment}"]) == 2
    run = tmp_path / "runs" / "tiny"
    assert capsys.readouterr().err == (
        f"error: {run} was trained from other inputs: the settings data.prompt changed. Predict "
        "with the run's own config (its config.toml) or train again\n")


def test_predict_cli_without_an_adapter_fails_clearly(tmp_path, capsys, monkeypatch):
    # Nothing is loaded before the check: a missing model would fail differently.
    monkeypatch.setattr("kaggle_pipeline.run_setup.load_model", lambda *a, **k: pytest.fail(
        "the model was loaded before the adapter was checked"))
    code = predict.main([f"output.dir={tmp_path}", "output.name=never-trained",
                         "model.checkpoint=/nonexistent/model"])
    assert code == 2
    err = capsys.readouterr().err
    adapter = tmp_path / "never-trained" / "adapter"
    assert f"error: {adapter}: no trained adapter" in err
    assert "python -m kaggle_pipeline.train" in err


def test_write_predictions_keeps_tsv_cells_on_one_line(tmp_path):
    test = tmp_path / "test.tsv"
    pl.DataFrame({"원문": ["하나", "둘"]}).write_csv(test, separator="\t")
    cfg = translation_config(tmp_path, test)
    path = submission.write_task_submission(get_task("aihub-parallel"), test,
                                            cfg.output.submissions, ["1", "2"],
                                            ["two\tlines\nhere", "  "])
    assert path.read_text(encoding="utf-8").splitlines() == [
        "id\ten", "1\ttwo lines here", f"2\t{submission.EMPTY_ANSWER}"]


def test_task_sampling_settings_reach_the_decoder(model, variables, tokenizer):
    """task.temperature / top_k / max_new_tokens decide how predict decodes: greedy at 0, and
    with a temperature draws that follow train.seed (the same seed, the same answers)."""
    examples = [Example(id=str(i), conversation=p) for i, p in enumerate(prompts_of(REVIEWS))]
    spec = get_task("tarr-sentiment")

    def answers(*overrides):
        cfg = load_config(None, ["task.max_new_tokens=6", *overrides])
        return predict.generate_answers(model, variables, tokenizer, spec, examples, cfg).texts

    greedy = answers()
    direct = predictions.generate(model, variables, tokenizer, spec, examples, max_new_tokens=6)
    assert greedy == direct.texts
    sampled = answers("task.temperature=5.0", "train.seed=1")
    assert sampled == answers("task.temperature=5.0", "train.seed=1")
    assert sampled != greedy
    assert sampled != answers("task.temperature=5.0", "train.seed=2")
    # top_k = 1 keeps only the most likely token: greedy whatever the temperature.
    assert answers("task.temperature=5.0", "task.top_k=1") == greedy
