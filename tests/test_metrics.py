"""Metrics against values worked out by hand (sklearn's documented examples where they exist)."""

from __future__ import annotations

import itertools
import sys
import types
import unicodedata

import numpy as np
import pytest

from kaggle_pipeline.evaluation import metrics

# ---------------------------------------------------------------- classification


def test_accuracy():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert metrics.accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0


def test_confusion_matrix_sklearn_doc_example():
    # sklearn.metrics.confusion_matrix docstring example.
    cm = metrics.confusion_matrix([2, 0, 2, 2, 0, 1], [0, 0, 2, 2, 0, 2])
    np.testing.assert_array_equal(cm, [[2, 0, 0], [0, 0, 1], [1, 0, 2]])
    cm = metrics.confusion_matrix(["cat", "ant", "cat", "cat", "ant", "bird"],
                                  ["ant", "ant", "cat", "cat", "ant", "cat"],
                                  labels=["ant", "bird", "cat"])
    np.testing.assert_array_equal(cm, [[2, 0, 0], [0, 0, 1], [1, 0, 2]])


def test_confusion_matrix_explicit_labels_select_and_order():
    cm = metrics.confusion_matrix([1, 0, 1, 2], [1, 1, 0, 2], labels=[1, 0])
    np.testing.assert_array_equal(cm, [[1, 1], [1, 0]])  # the label-2 item is left out


def test_macro_f1_sklearn_doc_example():
    # f1_score([0,1,2,0,1,2], [0,2,1,0,0,1], average="macro") = 0.2666...
    # class 0: TP=2 FP=1 FN=0 -> 4/5; classes 1 and 2: TP=0 -> 0.
    y_true, y_pred = [0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]
    assert metrics.per_class_f1(y_true, y_pred) == {0: 0.8, 1: 0.0, 2: 0.0}
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(0.8 / 3)


def test_macro_f1_binary_by_hand():
    # positive: TP=2 FP=1 FN=1 -> 4/6; negative: TP=1 FP=1 FN=1 -> 2/4.
    y_true, y_pred = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_macro_f1_absent_label_counts_zero():
    assert metrics.macro_f1([0, 0], [0, 0], labels=[0, 1]) == 0.5


def test_classification_errors_are_clear():
    with pytest.raises(ValueError, match="y_true has 2 items but y_pred has 1"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        metrics.macro_f1([], [])


def _pairwise_auc(y_true, scores):
    pos = [s for s, y in zip(scores, y_true, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, y_true, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_sklearn_doc_example_and_ties():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # pos 0.5 ties both negatives (2 x 0.5), pos 0.9 beats both (2) -> 3 / 4.
    assert metrics.roc_auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.9]) == 0.75
    assert metrics.roc_auc([True, False], [0.2, 0.7]) == 0.0


def test_roc_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    s = rng.integers(0, 10, size=200) / 10  # heavy ties
    assert metrics.roc_auc(y, s) == pytest.approx(_pairwise_auc(y.tolist(), s.tolist()))


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="only one class"):
        metrics.roc_auc([1, 1], [0.3, 0.4])
    with pytest.raises(ValueError, match="binary"):
        metrics.roc_auc([0, 2], [0.3, 0.4])


# ---------------------------------------------------------------- BLEU / chrF


def test_bleu_char_tokenizer_by_hand():
    # chars: 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> exp smoothing gives 1/2;
    # equal lengths so BP = 1: BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25.
    assert metrics.bleu(["가나다라"], ["가나다마"]) == pytest.approx(100 * 0.125 ** 0.25)
    assert metrics.bleu(["오늘 날씨가 좋네요."], ["오늘 날씨가 좋네요."]) == pytest.approx(100.0)
    assert "tok:char" in metrics.bleu_signature()


def test_bleu_char_credits_shared_stems_that_word_level_misses():
    hyp, ref = ["학교에 갔다가 집에 왔다"], ["학교를 갔다가 집으로 왔다"]
    assert metrics.bleu(hyp, ref) > metrics.bleu(hyp, ref, tokenize="13a")


def test_bleu_refuses_tokenizers_that_need_downloads_or_mecab(monkeypatch, tmp_path):
    import sacrebleu.utils

    monkeypatch.setattr(sacrebleu.utils, "SACREBLEU_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="flores200.*offline"):
        metrics.bleu(["a"], ["a"], tokenize="flores200")
    monkeypatch.setitem(sys.modules, "mecab_ko", None)
    with pytest.raises(RuntimeError, match="mecab-ko"):
        metrics.bleu(["a"], ["a"], tokenize="ko-mecab")
    with pytest.raises(ValueError, match="unknown BLEU tokenizer"):
        metrics.bleu(["a"], ["a"], tokenize="nope")


def test_chrf_and_chrf_plus_plus_by_hand():
    # char n-gram F-beta: n=1 3/4, n=2 2/3, n=3 1/2, n=4 0; orders 5-6 have no n-grams
    # (not counted) -> (3/4 + 2/3 + 1/2) / 4.
    assert metrics.chrf(["가나다라"], ["가나다마"]) == pytest.approx(100 * (0.75 + 2 / 3 + 0.5) / 4)
    # chrF++ adds word 1-grams (one each, no match: counted, 0) -> same sum over 5 orders.
    assert metrics.chrf(["가나다라"], ["가나다마"], word_order=2) == pytest.approx(
        100 * (0.75 + 2 / 3 + 0.5) / 5)
    assert metrics.sentence_chrf("안녕하세요", "안녕하세요") == pytest.approx(100.0)


# ---------------------------------------------------------------- ROUGE


def test_rouge_identical_korean_is_one_in_both_units():
    text = "이 식당은 정말 맛있어요! 또 올게요 ㅎㅎ"
    for unit in ("word", "char"):
        assert metrics.rouge([text], [text], unit=unit) == {"rouge1": 1.0, "rouge2": 1.0,
                                                            "rougeL": 1.0}


def test_rouge_normalizes_unicode_case_and_punctuation():
    nfd = unicodedata.normalize("NFD", "맛있어요")
    assert nfd != "맛있어요"
    assert metrics.rouge([nfd], ["맛있어요"])["rouge1"] == 1.0
    assert metrics.rouge(["Hello, World!"], ["hello world"])["rouge2"] == 1.0
    assert metrics.rouge_tokens("ＡＢＣ 가나, 다!") == ["abc", "가나", "다"]
    assert metrics.rouge_tokens("가 나.", unit="char") == ["가", "나"]


def test_rouge_small_cases_by_hand():
    # words: 3 each, 2 shared, no shared bigram, LCS 2.
    scores = metrics.rouge(["나는 밥을 먹었다"], ["나는 빵을 먹었다"])
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.0, "rougeL": 2 / 3})
    # chars: 7 each; 6 shared unigrams, 4 of 6 bigrams, LCS 6.
    scores = metrics.rouge(["나는 밥을 먹었다"], ["나는 빵을 먹었다"], unit="char")
    assert scores == pytest.approx({"rouge1": 6 / 7, "rouge2": 4 / 6, "rougeL": 6 / 7})
    # P=1, R=2/3 -> F = 0.8; the single hyp bigram is not in the reference.
    scores = metrics.rouge(["고양이가 잔다"], ["고양이가 소파에서 잔다"])
    assert scores == pytest.approx({"rouge1": 0.8, "rouge2": 0.0, "rougeL": 0.8})


def test_rouge_averages_segments():
    scores = metrics.rouge(["가 나", "다"], ["가 나", "라"])
    assert scores["rouge1"] == 0.5 and scores["rougeL"] == 0.5


# ---------------------------------------------------------------- script / language mismatch


def test_script_ratios_by_hand():
    # letters: ㅋㅋ맛있어요 (6 hangul) iPhone (6 latin) 東京 (2 han) カタカナ (4 kana); the
    # digits, spaces and emoji are not letters.
    ratios = metrics.script_ratios("ㅋㅋ 맛있어요 iPhone 東京 カタカナ 123 👌")
    assert ratios == pytest.approx({"hangul": 6 / 18, "latin": 6 / 18, "han": 2 / 18,
                                    "kana": 4 / 18, "other": 0.0})
    assert metrics.dominant_script("Привет мир") == "other"
    assert metrics.dominant_script("123 !!") is None


def test_script_mismatch_rules():
    ref = "오늘 날씨가 좋네요."
    assert metrics.is_script_mismatch("The weather is nice today.", reference=ref)
    assert not metrics.is_script_mismatch("오늘 Galaxy 날씨가 좋네요", reference=ref)
    assert metrics.is_script_mismatch("", reference=ref)
    assert metrics.is_script_mismatch("今日は天気がいいですね", reference=ref)
    assert not metrics.is_script_mismatch("42", reference="42")
    assert metrics.is_script_mismatch("안녕", expected="latin")
    with pytest.raises(ValueError, match="unknown script"):
        metrics.is_script_mismatch("안녕", expected="cyrillic")


def test_generation_scores_zero_wrong_script_outputs():
    refs = ["오늘 날씨가 정말 좋네요", "저녁에 비가 온대요"]
    hyps = ["오늘 날씨가 정말 좋네요", "It will rain in the evening"]
    scores = metrics.generation_scores(hyps, refs)
    assert scores["mismatch_rate"] == 0.5
    assert scores["rouge1"] == 0.5 and scores["rougeL_char"] == 0.5
    blanked = ["오늘 날씨가 정말 좋네요", ""]
    assert scores["bleu"] == pytest.approx(metrics.bleu(blanked, refs))
    assert scores["chrf"] == pytest.approx(metrics.chrf(blanked, refs))
    assert scores["chrf_pp"] == pytest.approx(metrics.chrf(blanked, refs, word_order=2))
    assert scores["bleu"] < metrics.bleu(hyps[:1], refs[:1])


def test_generation_scores_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.generation_scores(["가", "나"], ["가"])
    with pytest.raises(TypeError, match=r"hypotheses\[1\] is NoneType"):
        metrics.generation_scores(["가", None], ["가", "나"])


# ---------------------------------------------------------------- COMET hook


def test_comet_without_package_names_it(monkeypatch, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "comet", None)  # import comet -> ImportError
    with pytest.raises(RuntimeError, match="unbabel-comet") as err:
        metrics.comet_scores(["src"], ["번역"], ["번역"], checkpoint=ckpt)
    assert "checkpoint file" not in str(err.value)
    with pytest.raises(RuntimeError, match=r"checkpoint file .*missing\.ckpt"):
        metrics.comet_scores(["src"], ["번역"], ["번역"], checkpoint=tmp_path / "missing.ckpt")


def test_comet_with_local_checkpoint_zeroes_mismatches(monkeypatch, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    calls = {}

    class FakeModel:
        def predict(self, data, batch_size, gpus):
            calls["data"], calls["gpus"] = data, gpus
            return {"scores": [0.9, 0.7]}

    def load_from_checkpoint(path):
        calls["path"] = path
        return FakeModel()

    monkeypatch.setitem(sys.modules, "comet",
                        types.SimpleNamespace(load_from_checkpoint=load_from_checkpoint))
    out = metrics.comet_scores(["a", "b"], ["좋아요", "good"], ["좋아요", "좋네요"],
                               checkpoint=ckpt)
    assert calls["path"] == str(ckpt) and calls["gpus"] == 0
    assert calls["data"][1] == {"src": "b", "mt": "good", "ref": "좋네요"}
    assert out == {"segments": [0.9, 0.0], "system": pytest.approx(0.45), "mismatch_rate": 0.5}
