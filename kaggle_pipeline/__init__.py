"""kaggle-pipeline: fine-tune Gemma 2 / Gemma 3 with LoRA in JAX/Flax for Kaggle competitions."""

__version__ = "0.1.0"

import sys as _sys

if _sys.argv[:1] == ["-m"] and "kaggle_pipeline.host_malloc" not in _sys.orig_argv:
    # `python -m kaggle_pipeline.<command>`: the package is imported before the command's module
    # (and jax), and sys.argv[0] is "-m" only then. Restart with tcmalloc if the machine has it
    # (host_malloc.py). `-m kaggle_pipeline.host_malloc` does it itself, as its __main__.
    from kaggle_pipeline.host_malloc import restart_with_allocator

    restart_with_allocator()
