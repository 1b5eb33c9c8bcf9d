"""AIFactory restaurant-review sentiment: what this kernel adds to kernels/runner.py."""

SUBMISSION_FILE = "submission.tsv"
INPUTS = {
    "train_file": "**/tarr-review-sentiment/train.tsv",
    "test_file": "**/tarr-review-sentiment/test.tsv",
    "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*",
}
