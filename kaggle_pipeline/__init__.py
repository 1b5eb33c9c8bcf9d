"""kaggle-pipeline: fine-tune Gemma 2 / Gemma 3 with LoRA in JAX/Flax for Kaggle competitions."""

import os

__version__ = "0.1.0"

# On CPU, XLA's default Eigen matmuls reach about a third of what this machine's cores can do;
# YNNPACK fusions for dots and element-wise ops make a LoRA step on Gemma 3 270M ~2x faster
# (BENCHMARKS.md). Only CPU compilation reads the flag; set XLA_FLAGS yourself to opt out.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"
if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAG).strip()
