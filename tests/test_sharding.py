"""Sharded training on 8 faked CPU devices gives the single-device result.

XLA fixes the CPU device count when jax starts, so the runs happen in a subprocess started with
--xla_force_host_platform_device_count=8; this test process keeps its own jax untouched.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# (data, fsdp, model) meshes; (1, 1, 1) on one device is the reference.
LORA_MESHES = [(8, 1, 1), (2, 1, 4), (1, 1, 8), (2, 2, 2)]
FULL_MESHES = [(2, 1, 4)]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from kaggle_pipeline.checkpoints.common import flatten
    from kaggle_pipeline.model import Transformer
    from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
    from kaggle_pipeline.model.sharding import make_mesh
    from kaggle_pipeline.training.step import Trainer
    from tiny_lora_case import tiny_lora_case

    lora_meshes, full_meshes = json.loads(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    config, params, lora_config, lora, steps = tiny_lora_case()

    SHOWN = ("embedder/input_embedding", "layer_0/attn/q_einsum/w", "layer_0/attn/kv_einsum/w",
             "layer_0/mlp/gating_einsum")

    def run(shape, mode):
        mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        trainer = Trainer(Transformer(config, lora_scale=lora_config.scale),
                          make_optimizer(OptimConfig(learning_rate=1e-3), 10), mesh, mode)
        state = trainer.init_state(lora if mode == "lora" else params)
        frozen = jax.device_put(params, trainer.frozen_shardings(params)) if mode == "lora" \\
            else {}
        step = trainer.compile_step(state, frozen)
        placed = flatten(frozen if mode == "lora" else state["trainable"])
        specs = {k: [None if a is None else str(a) for a in placed[k].sharding.spec]
                 for k in SHOWN}
        losses = []
        for batch in steps:
            state, metrics = step(state, frozen, trainer.put_batch(batch))
            losses.append(float(metrics["loss"]))
        return losses, flatten(jax.device_get(state["trainable"])), specs

    out = {}
    for mode, meshes in (("lora", lora_meshes), ("full", full_meshes)):
        ref_losses, ref_trained, _ = run((1, 1, 1), mode)
        start = flatten(lora if mode == "lora" else params)
        moved = max(float(np.abs(ref_trained[k] - start[k]).max()) for k in start)
        for shape in meshes:
            losses, trained, specs = run(tuple(shape), mode)
            out[f"{mode} {shape}"] = {
                "ref_losses": ref_losses, "losses": losses, "moved": moved,
                "max_param_diff": max(float(np.abs(trained[k] - ref_trained[k]).max())
                                      for k in ref_trained),
                "specs": specs}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_runs() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"),
                                       os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([LORA_MESHES, FULL_MESHES])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _check_same_as_one_device(run: dict) -> None:
    assert len(run["losses"]) == 3
    for loss, ref in zip(run["losses"], run["ref_losses"], strict=True):
        assert abs(loss - ref) <= 1e-5
    assert run["ref_losses"][0] != run["ref_losses"][2]  # three different batches
    assert run["max_param_diff"] <= 1e-5
    assert run["moved"] > 1e-3  # training moved the params far more than the tolerance


@pytest.mark.parametrize("shape", LORA_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_lora_training_on_a_mesh_equals_one_device(sharded_runs, shape):
    _check_same_as_one_device(sharded_runs[f"lora {list(shape)}"])


def test_full_fine_tuning_on_a_2x4_mesh_equals_one_device(sharded_runs):
    run = sharded_runs["full [2, 1, 4]"]
    _check_same_as_one_device(run)
    # Trainable params really are split: heads and kv heads over model, vocabulary too.
    assert run["specs"]["layer_0/attn/kv_einsum/w"] == [None, "model", None, None]
    assert run["specs"]["embedder/input_embedding"] == ["model", None]


def test_params_are_sharded_as_the_rules_say(sharded_runs):
    specs = sharded_runs["lora [1, 1, 8]"]["specs"]
    assert specs["layer_0/attn/q_einsum/w"] == ["model", None, None]  # 8 heads on 8 devices
    # 4 kv heads do not split 8 ways: replicated, and the run above still matches.
    assert specs["layer_0/attn/kv_einsum/w"] == [None, None, None, None]
    assert specs["layer_0/mlp/gating_einsum"] == [None, None, "model"]
    specs = sharded_runs["lora [2, 2, 2]"]["specs"]
    assert specs["embedder/input_embedding"] == ["model", "fsdp"]
    assert specs["layer_0/attn/q_einsum/w"] == ["model", "fsdp", None]
