"""Multi-host training with real processes: two jax processes on this machine (2 faked CPU
devices each, gloo collectives) join through `maybe_initialize_distributed`, each feeds only its
rows of every global batch, and 3 LoRA steps give the single-device result."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from kaggle_pipeline.model import sharding
    from kaggle_pipeline.checkpoints.common import flatten
    from kaggle_pipeline.model import Transformer
    from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
    from kaggle_pipeline.training.step import Trainer
    from tiny_lora_case import tiny_lora_case

    shape, out = json.loads(sys.argv[1]), sys.argv[2]
    sharding.maybe_initialize_distributed()
    config, params, lora_config, lora, steps = tiny_lora_case()

    mesh = sharding.make_mesh(*shape)
    trainer = Trainer(Transformer(config, lora_scale=lora_config.scale),
                      make_optimizer(OptimConfig(learning_rate=1e-3), 10), mesh, "lora")
    state = trainer.init_state(lora)
    frozen = jax.device_put(params, trainer.frozen_shardings(params))
    step = trainer.compile_step(state, frozen)
    losses = []
    for batch in steps:
        state, metrics = step(state, frozen, trainer.put_batch(batch))
        losses.append(float(metrics["loss"]))
    gathered = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
                            state["trainable"])
    if jax.process_index() == 0:
        np.savez(out, **flatten(gathered))
        print("RESULT " + json.dumps({"losses": losses, "processes": jax.process_count(),
                                      "devices": jax.device_count(),
                                      "local_devices": jax.local_device_count()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict | None = None) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"),
                                       os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, **(extra or {})}


def _result(stdout: str) -> dict:
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def single_device(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("single") / "trained.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "[1, 1, 1]", str(out)], cwd=REPO,
                          env=_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout), dict(np.load(out))


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 1, 4)], ids=["data2xmodel2", "model4"])
def test_two_processes_train_like_one_device(shape, single_device, tmp_path):
    port = _free_port()
    out = tmp_path / "trained.npz"
    procs = [subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(shape), str(out)], cwd=REPO,
        env=_env(2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": str(i)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    run = _result(outputs[0][0])
    assert (run["processes"], run["devices"], run["local_devices"]) == (2, 4, 2)

    ref, ref_trained = single_device
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][0] != ref["losses"][2]  # three different batches
    trained = dict(np.load(out))
    assert trained.keys() == ref_trained.keys()
    start = max(float(np.abs(ref_trained[k]).max()) for k in ref_trained)
    assert start > 1e-3  # LoRA B moved away from zero: there is something to compare
    for key, value in ref_trained.items():
        np.testing.assert_allclose(trained[key], value, atol=1e-6, err_msg=key)
