"""`python -m kaggle_pipeline.plan` compiles a tiny run for a TPU v3-8 (through libtpu, on this
CPU) in seconds, reports per-device bytes that match the sharded params, says it fits (exit 0),
and says what to change when the memory is too small (exit 3)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.plan import model_flops_per_token

TINY = ["model.checkpoint=", "model.preset=tiny-gemma2", "train.mesh_data=1",
        "train.mesh_fsdp=8", "data.batch_size=8", "data.seq_len=64"]


def _plan(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "kaggle_pipeline.plan", "--json", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.fixture(scope="module")
def v3_plan() -> tuple[int, dict]:
    return _plan("--target", "v3-8", *TINY)


def test_a_tiny_run_fits_a_v3_8(v3_plan):
    code, result = v3_plan
    assert code == 0 and result["fits"] is True
    assert result["devices"] == 8 and result["device_kind"] == "TPU v3"
    assert result["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
    assert result["model"]["dtype"] == "bfloat16"  # "auto" on a TPU
    assert set(result["programs"]) == {"train", "score", "decode"}
    for name, program in result["programs"].items():
        assert program["fits"] is True, name
        assert program["compile_seconds"] < 120, name
        assert program["peak_bytes_per_device"] >= program["argument_bytes_per_device"] > 0


def test_the_bytes_are_the_sharded_params(v3_plan):
    _, result = v3_plan
    config = tiny_config("gemma2", vocab_size=262_144)
    param_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(abstract_params(config)))
    score = result["programs"]["score"]
    # Each core holds its eighth of the bf16 weights (norms and a few small tensors replicated)
    # and the batch, not the whole model.
    assert param_bytes / 8 <= score["argument_bytes_per_device"] < param_bytes / 4
    train = result["programs"]["train"]
    # loss_on = "label" (the default): 16 loss positions per row of 64.
    assert train["flops_per_token"] == pytest.approx(model_flops_per_token(config, 64, 16 / 64, 2))


def test_too_little_memory_exits_3_with_the_setting_to_change():
    code, result = _plan("--target", "v3-8", "--programs", "train", "--memory-gb", "0.01", *TINY)
    assert code == 3 and result["fits"] is False
    train = result["programs"]["train"]
    assert train["fits"] is False
    assert train["advice"][0] == "model.remat=true"


def test_an_unknown_target_is_a_user_error():
    proc = subprocess.run([sys.executable, "-m", "kaggle_pipeline.plan", "--target", "v9-8",
                           *TINY], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--target 'v9-8': one of cpu, local, v3-8, v5e-8, v4-8" in proc.stderr


def test_the_9b_review_kernel_builds_for_the_v3_8_mesh(tmp_path):
    """The kernel's config is what `plan --config kernels/tarr-sentiment-9b/config.toml
    --target v3-8` compiles (BENCHMARKS.md); here: it builds and asks for the 9B on 8 cores."""
    from kaggle_pipeline import kernels
    from kaggle_pipeline.run_config import load_config

    out = kernels.build("tarr-sentiment-9b", tmp_path / "k", username="alice")
    cfg = load_config(REPO / "kernels" / "tarr-sentiment-9b" / "config.toml")
    assert cfg.model.preset == "gemma2-9b-it" and cfg.model.scan_layers and cfg.model.remat
    assert (cfg.train.mesh_data, cfg.train.mesh_fsdp, cfg.train.mesh_model) == (1, 8, 1)
    meta = json.loads((out / "kernel-metadata.json").read_text())
    assert meta["model_sources"] == ["google/gemma-2/flax/gemma2-9b-it/1"]
    assert meta["id"] == "alice/tarr-sentiment-gemma-9b"
