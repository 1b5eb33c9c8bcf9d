"""Dolly English -> Korean: what this kernel adds to kernels/runner.py."""

SUBMISSION_FILE = "submission.csv"
# Dolly comes as two line-aligned JSON-lines files, English and Korean, for training and for the
# held-out test records.
INPUTS = {
    "train_en": "**/dolly-en-ko/train.en.jsonl",
    "train_ko": "**/dolly-en-ko/train.ko.jsonl",
    "test_en": "**/dolly-en-ko/test.en.jsonl",
    "test_ko": "**/dolly-en-ko/test.ko.jsonl",
    "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*",
}
