"""Template kernel: what a kernel adds to kernels/runner.py, its shared code.

SUBMISSION_FILE is the file the competition takes (.csv or .tsv), written to the working dir.
INPUTS maps each placeholder of config.toml to a glob under KAGGLE_INPUT_ROOT that must match
exactly one path (models mount as <model>/<framework>/<variation>/<version>). Nothing else
belongs here: the build refuses any other statement.
"""

SUBMISSION_FILE = "submission.tsv"
INPUTS = {
    "train_file": "**/your-dataset/train.tsv",
    "test_file": "**/your-dataset/test.tsv",
    "model_dir": "**/gemma-2/flax/gemma2-2b-it/[0-9]*",
}
