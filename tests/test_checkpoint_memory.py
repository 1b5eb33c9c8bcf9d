"""Loading holds about one copy of the params: peak RSS over the RSS after imports, in a fresh
process, stays under 1.5x the loaded params' bytes for safetensors (f32 and bf16) and GGUF.

The checkpoint is a 1-layer model with a 256 MiB embedding, so that the fixed cost of tracing the
param shapes (~40 MB) stays small next to it while a second copy (a file mapping left resident,
a copy in device_put) would still show as 2x or more.
"""

import json
import os
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from kaggle_pipeline.checkpoints import save_hf
from kaggle_pipeline.checkpoints.common import flatten, unflatten
from kaggle_pipeline.checkpoints.gguf_format import gguf_name
from kaggle_pipeline.checkpoints.hf_format import hf_layout_shapes, hf_tensor
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config

PROJECT = REPO
CONFIG = tiny_config("gemma3", num_layers=1, vocab_size=65_536, embed_dim=1024)
LIMIT = 1.5

MEASURE = """
import json, resource, sys
from pathlib import Path
import jax, jax.numpy as jnp
from kaggle_pipeline.checkpoints import load_checkpoint

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

jnp.zeros(1).block_until_ready()
baseline = status("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    peak = lambda: status("VmHWM")
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
_, params = load_checkpoint(sys.argv[1])
jax.block_until_ready(params)
print(json.dumps({"over_baseline": peak() - baseline,
                  "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape, np.float32)
              for k, v in flatten(abstract_params(CONFIG)).items()}
    root = tmp_path_factory.mktemp("memory")
    paths = {f"hf-{d}": save_hf(unflatten(params), CONFIG, root / d, dtype=getattr(jnp, d))
             for d in ("float32", "bfloat16")}

    writer = gguf.GGUFWriter(root / "model.gguf", "gemma3")
    for add, value in [(writer.add_block_count, CONFIG.num_layers),
                       (writer.add_embedding_length, CONFIG.embed_dim),
                       (writer.add_feed_forward_length, CONFIG.hidden_dim),
                       (writer.add_head_count, CONFIG.num_heads),
                       (writer.add_head_count_kv, CONFIG.num_kv_heads),
                       (writer.add_key_length, CONFIG.head_dim),
                       (writer.add_layer_norm_rms_eps, CONFIG.norm_eps),
                       (writer.add_sliding_window, CONFIG.sliding_window)]:
        add(value)
    for name in hf_layout_shapes(CONFIG):
        writer.add_tensor(gguf_name(name), np.asarray(hf_tensor(CONFIG, params, name)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths["gguf"] = root / "model.gguf"
    return paths


@pytest.mark.parametrize("fmt", ["hf-float32", "hf-bfloat16", "gguf"])
def test_peak_rss_while_loading_is_about_one_copy_of_the_params(checkpoints, fmt):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoints[fmt])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["param_bytes"] > 256 * 2**20
    ratio = result["over_baseline"] / result["param_bytes"]
    assert ratio <= LIMIT, f"{fmt}: peak RSS {ratio:.2f}x the params while loading"
