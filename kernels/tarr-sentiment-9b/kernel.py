"""AIFactory restaurant-review sentiment with Gemma 2 9B: what this kernel adds to
kernels/runner.py."""

SUBMISSION_FILE = "submission.tsv"
INPUTS = {
    "train_file": "**/tarr-review-sentiment/train.tsv",
    "test_file": "**/tarr-review-sentiment/test.tsv",
    "model_dir": "**/gemma-2/flax/gemma2-9b-it/[0-9]*",
}
