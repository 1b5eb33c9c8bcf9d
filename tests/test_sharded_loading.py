"""Loading straight into the mesh: on 8 faked CPU devices every param comes out on the sharding
the rule table gives it (none left whole on one device when the mesh splits it), with the same
values as a plain load, per layer or stacked for the layer scan, from a HF checkpoint and from
random init, through run_setup.load_model as the commands call it."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO

from kaggle_pipeline.checkpoints import save_hf
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config

CONFIG = dict(family="gemma2", num_layers=4, sliding_window=4, num_heads=8, num_kv_heads=4)

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from kaggle_pipeline import run_setup
    from kaggle_pipeline.checkpoints.common import flatten
    from kaggle_pipeline.model import layer_stack
    from kaggle_pipeline.model.config import tiny_config
    from kaggle_pipeline.model.sharding import make_mesh, param_shardings
    from kaggle_pipeline.run_config import ModelSection

    checkpoint, config_kwargs = sys.argv[1], json.loads(sys.argv[2])
    config = tiny_config(**config_kwargs)
    assert jax.device_count() == 8
    out = {}
    for shape in ((1, 8, 1), (2, 2, 2), (1, 1, 8)):
        mesh = make_mesh(*shape)
        for scan in (False, True):
            for source in ("hf", "random"):
                # random: a tiny preset's random init, placed on the mesh
                section = ModelSection(checkpoint=checkpoint if source == "hf" else "",
                                       preset="" if source == "hf" else "tiny-gemma2",
                                       param_dtype="float32", scan_layers=scan)
                _, params = run_setup.load_model(section, mesh=mesh)
                want = flatten(param_shardings(params, mesh, config.transpose_gating_einsum))
                rows = {}
                for path, array in flatten(params).items():
                    spec = want[path].spec
                    shard = array.addressable_shards[0].data.shape
                    rows[path] = {
                        "same_spec": array.sharding.spec == spec,
                        "split": any(s is not None for s in spec),
                        "devices": len(array.sharding.device_set),
                        "smaller_shard": shard != array.shape,
                        "stacked": path.startswith(layer_stack.STACK),
                        "value": float(np.asarray(array).sum()),
                    }
                key = f"{'x'.join(map(str, shape))} scan={scan} {source}"
                out[key] = rows
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    config = tiny_config(**CONFIG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                          abstract_params(config))
    checkpoint = save_hf(params, config, tmp_path_factory.mktemp("hf") / "model",
                         dtype=np.float32)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint), json.dumps(CONFIG)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), params


def test_every_param_lands_on_its_rule_table_sharding(loaded):
    runs, _ = loaded
    assert len(runs) == 12
    for key, rows in runs.items():
        for path, row in rows.items():
            assert row["same_spec"], f"{key}: {path}"
            assert row["devices"] == 8, f"{key}: {path}"  # on the whole mesh
            # Split by the rules: each device holds a part, never the whole tensor.
            assert row["smaller_shard"] == row["split"], f"{key}: {path}"


def test_the_mesh_really_splits_the_weights(loaded):
    runs, _ = loaded
    for key, rows in runs.items():
        split = [p for p, r in rows.items() if r["split"]]
        # fsdp=8 splits every matrix along embed; 1x1x8 the heads, MLP and vocabulary.
        assert len(split) >= 5, key
        assert "embedder/input_embedding" in split, key
    stacked = runs["1x8x1 scan=True hf"]
    assert any(r["stacked"] and r["split"] for r in stacked.values())


def test_sharded_and_stacked_loads_keep_the_values(loaded):
    runs, params = loaded
    from kaggle_pipeline.checkpoints.common import flatten

    want = {k: float(np.asarray(v).sum()) for k, v in flatten(params).items()}
    for key, rows in runs.items():
        if not key.endswith(" hf"):
            continue
        if "scan=False" in key:
            for path, row in rows.items():
                assert row["value"] == pytest.approx(want[path], rel=1e-5, abs=1e-4), key
        else:  # a stacked tensor holds the sum of its layers
            total = sum(r["value"] for r in rows.values())
            assert total == pytest.approx(sum(want.values()), rel=1e-5, abs=1e-3), key
