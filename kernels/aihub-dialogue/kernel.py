"""AI Hub emotional dialogue: what this kernel adds to kernels/runner.py."""

SUBMISSION_FILE = "submission.csv"
INPUTS = {
    "train_file": "**/aihub-emotional-dialogue/train.json",
    "test_file": "**/aihub-emotional-dialogue/test.json",
    "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*",
}
