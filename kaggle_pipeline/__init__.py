"""kaggle-pipeline: fine-tune Gemma 2 / Gemma 3 with LoRA in JAX/Flax for Kaggle competitions."""

__version__ = "0.1.0"
