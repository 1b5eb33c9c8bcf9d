"""Label scoring and generation on a mesh of 8 faked CPU devices give the single-device results.

XLA fixes the CPU device count when jax starts, so one subprocess started with
--xla_force_host_platform_device_count=8 runs the reference and all three meshes; this test
process keeps its own jax untouched.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# (data, fsdp, model): prompts over data, weights over fsdp, heads / vocabulary over model.
MESHES = [(8, 1, 1), (1, 8, 1), (2, 1, 4)]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf
    from kaggle_pipeline.data.chat_template import Turn
    from kaggle_pipeline.data.tokenizer import Tokenizer
    from kaggle_pipeline.inference.label_scoring import score_labels
    from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig, generate_many
    from kaggle_pipeline.model import Transformer, abstract_params
    from kaggle_pipeline.model.config import tiny_config
    from kaggle_pipeline.model.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig, init_lora
    from kaggle_pipeline.model.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    # 8 query / 4 kv heads, embed 32, MLP 64, the real 262k vocabulary: every sharded dimension
    # divides its mesh axis.
    config = tiny_config("gemma3", vocab_size=262_144, num_heads=8, num_kv_heads=4,
                         sliding_window=6)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          abstract_params(config))
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=ATTENTION_TARGETS + MLP_TARGETS)
    lora = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        jax.device_get(init_lora(config, lora_config, jax.random.key(1))))
    variables = {"params": params, "lora": lora}
    model = Transformer(config, lora_scale=lora_config.scale)
    tokenizer = Tokenizer.from_gguf(gemma3_270m_gguf())
    reviews = ["국물이 진하고 면이 쫄깃해요", "웨이팅 1시간 실화냐... 맛은 그냥 그럼", "최악",
               "사장님 친절하시고 가격도 착해요", "다시는 안 가요", "그냥 그래요", "또 올게요!",
               "양이 적어요", "분위기 좋아요"]
    prompts = [[Turn("user", f"리뷰: {r}")] for r in reviews]
    words = ["긍정", "부정", "잘 모르겠음"]
    token_prompts = [list(rng.integers(3, 5000, int(n))) for n in rng.integers(3, 40, 11)]
    token_prompts = [[int(t) for t in p] for p in token_prompts]

    def run(mesh):
        scores = score_labels(model, variables, tokenizer, prompts, words, seq_len=32,
                              batch_size=8, mesh=mesh).scores
        sampler = Sampler(model, stop_ids=[1], pad_multiple=8, mesh=mesh)
        batch = sampler.generate(variables, token_prompts[:8], SamplingConfig(max_new_tokens=10))
        many = generate_many(sampler, variables, token_prompts, SamplingConfig(max_new_tokens=7),
                             token_budget=8 * 48, max_batch=8).tokens
        return scores, batch, many

    ref_scores, ref_batch, ref_many = run(None)
    out = {"distinct_scores": len(set(np.round(ref_scores.ravel(), 3))),
           "new_tokens": sum(map(len, ref_batch))}
    for shape in json.loads(sys.argv[1]):
        scores, batch, many = run(make_mesh(*shape))
        out[str(shape)] = {"score_diff": float(np.abs(scores - ref_scores).max()),
                           "same_batch": batch == ref_batch, "same_many": many == ref_many}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_inference() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MESHES)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_scoring_and_greedy_generation_on_a_mesh_equal_one_device(sharded_inference, shape):
    run = sharded_inference[str(list(shape))]
    assert run["score_diff"] <= 1e-5
    assert run["same_batch"] and run["same_many"]
    # The reference really computed something: distinct scores, tokens before any stop.
    assert sharded_inference["distinct_scores"] > 10
    assert sharded_inference["new_tokens"] > 40
