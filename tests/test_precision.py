"""The precision policy: what "auto" means where; bf16 operands with f32 accumulation in every
matmul of the train step, f32 trainable factors and optimizer state; the real Gemma 3 270M in
bf16 within the stated tolerance of its f32 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaggle_pipeline.model import Transformer, abstract_params, precision
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import LoraConfig, init_lora
from kaggle_pipeline.model.loss import sequence_loss
from kaggle_pipeline.model.sharding import make_mesh
from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
from kaggle_pipeline.training.step import Trainer


@pytest.mark.parametrize("platform,flags,expected", [
    ("tpu", set(), jnp.bfloat16), ("gpu", set(), jnp.bfloat16), ("cuda", set(), jnp.bfloat16),
    ("cpu", {"avx2", "fma"}, jnp.float32), ("cpu", {"avx512f", "avx512_bf16"}, jnp.float32),
    ("cpu", {"amx_bf16", "amx_tile", "avx512_bf16"}, jnp.bfloat16)])
def test_auto_is_bf16_where_bf16_matmuls_are_fast(monkeypatch, platform, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve("auto", platform) == jnp.dtype(expected)
    assert precision.resolve("float32", platform) == jnp.float32
    assert precision.resolve("bfloat16", platform) == jnp.bfloat16


def _dots(jaxpr) -> list:
    """Every dot_general of a jaxpr, nested ones (jit, remat, scan, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_dots(inner))
    return found


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_train_step_accumulates_every_matmul_in_f32(scan):
    config = tiny_config("gemma3", num_layers=6)
    lora_cfg = LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"))
    model = Transformer(config, dtype=jnp.bfloat16, lora_scale=lora_cfg.scale,
                        scan_layers=scan)
    params = abstract_params(config, jnp.bfloat16, scan)
    lora = jax.eval_shape(lambda: init_lora(config, lora_cfg, jax.random.key(0)))
    if scan:
        from kaggle_pipeline.model import layer_stack

        lora = jax.eval_shape(lambda t: layer_stack.stack(t, config), lora)
    batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32)
             for k in ("tokens", "positions", "segment_ids", "loss_src")}
    batch["loss_valid"] = jax.ShapeDtypeStruct((2, 16), jnp.bool_)

    def loss(lora, params, batch):
        return sequence_loss(model, {"params": params, "lora": lora}, batch)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora, params, batch)
    dots = _dots(jaxpr.jaxpr)
    assert len(dots) > 20
    for eqn in dots:
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
    # Forward and backward, the matmuls take bf16 operands (an f32 x bf16 dot runs as f32),
    # except the unembedding's gradient back to the hidden states and the loss chunk's.
    mixed = [e for e in dots if len({v.aval.dtype for v in e.invars}) > 1]
    assert len(mixed) <= 2, [str(e) for e in mixed]
    assert sum(all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars) for eqn in dots) > 20
    # The factors' gradient comes back f32, like the factors.
    grads = jaxpr.out_avals
    assert all(g.dtype == jnp.float32 for g in grads)

    mesh = make_mesh(devices=jax.devices()[:1])
    trainer = Trainer(model, make_optimizer(OptimConfig(), 10), mesh, "lora")
    state = trainer.abstract_state(lora)
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))


# Stated tolerance of bf16 (bf16 weights and activations, f32 accumulation, f32 residual stream,
# norms, softmax and logits) against the f32 oracle on the real Gemma 3 270M, over every position
# of four Korean and English prompts (BENCHMARKS.md: measured mean KL 0.0049, top-1 agreement
# 97%, top-1 log-prob within 0.25, max |logit diff| 3.2 for logits of std 6.9).
BF16_TOLERANCE = {"kl_mean": 0.01, "top1_agreement": 0.95, "top1_logprob_diff": 0.4,
                  "max_abs_logit_diff": 5.0}
PROMPTS = ["리뷰: 음식이 정말 맛있고 직원들도 친절했어요. 다음에 또 올게요!\n"
           "이 리뷰는 긍정인가요 부정인가요?",
           "리뷰: 너무 짜고 비싸요. 서비스도 별로였습니다.\n이 리뷰는 긍정인가요 부정인가요?",
           "The quick brown fox jumps over the lazy dog. Translate this sentence into Korean:",
           "서울의 날씨는 오늘 맑고 따뜻합니다. 내일은 비가 올 예정입니다."]


def test_real_270m_in_bf16_is_within_the_stated_tolerance(gemma3_tokenizer, gemma3_270m):
    config, params = gemma3_270m
    ids = [gemma3_tokenizer.encode(t) for t in PROMPTS]
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    segments = np.zeros_like(tokens)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], segments[i, :len(x)] = x, 1
    positions = np.broadcast_to(np.arange(t), tokens.shape)
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        weights = jax.tree.map(lambda p, d=dtype: p.astype(d), params)
        out, _ = jax.jit(Transformer(config, dtype=dtype).apply)(
            {"params": weights}, tokens, positions, segments)
        logits[dtype] = np.asarray(out, np.float32)[segments.astype(bool)]
    ref, low = logits[jnp.float32], logits[jnp.bfloat16]
    lp_ref, lp_low = jax.nn.log_softmax(ref), jax.nn.log_softmax(low)
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp_low), axis=-1)
    top = ref.argmax(-1)[:, None]
    top_diff = np.abs(np.take_along_axis(lp_ref - lp_low, top, 1))
    assert float(kl.mean()) <= BF16_TOLERANCE["kl_mean"]
    assert float(np.mean(low.argmax(-1) == ref.argmax(-1))) >= BF16_TOLERANCE["top1_agreement"]
    assert float(top_diff.max()) <= BF16_TOLERANCE["top1_logprob_diff"]
    assert float(np.abs(ref - low).max()) <= BF16_TOLERANCE["max_abs_logit_diff"]
    assert float(np.abs(ref - low).max()) > 0.01  # bf16 really ran


def test_bf16_einsum_gradient_is_the_f32_gradient_within_bf16_rounding():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)

    def f(x, w):
        return jnp.sum(precision.einsum("BTD,NDH->BTNH", x, w) * g)

    def f32(x, w):
        return jnp.sum(jnp.einsum("BTD,NDH->BTNH", x.astype(jnp.float32),
                                  w.astype(jnp.float32)) * g)

    got = jax.grad(f, argnums=(0, 1))(x, w)
    want = jax.grad(f32, argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 2e-2 * scale
    # f32 operands: the plain einsum (the f32 job's program is unchanged).
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(precision.einsum(
        "BTD,NDH->BTNH", x.astype(jnp.float32), w))))(w.astype(jnp.float32))
    assert "custom_vjp" not in str(jaxpr)


def _saved_residuals(dtype, remat: bool, policy: str) -> int:
    import contextlib
    import io

    from kaggle_pipeline.model import init_params

    config = tiny_config("gemma2", num_layers=2)
    params = jax.tree.map(lambda p: p.astype(dtype),
                          init_params(config, jax.random.key(0), scan_layers=True))
    batch = {k: jnp.ones((1, 8), jnp.int32)
             for k in ("tokens", "positions", "segment_ids", "loss_src")}
    batch["loss_valid"] = jnp.ones((1, 8), bool)
    model = Transformer(config, dtype=dtype, remat=remat, remat_policy=policy, scan_layers=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: sequence_loss(model, {"params": p}, batch)[0], params)
    return len(out.getvalue().splitlines())


def test_remat_policies_see_the_bf16_matmuls():
    """The bf16 matmul is a custom VJP, invisible to dot-based policies: it is found by name,
    so each policy keeps as much in bf16 as in f32 (a scan without remat keeps what "dots"
    keeps, "full" least)."""
    for remat, policy in ((False, "full"), (True, "full"), (True, "dots")):
        assert _saved_residuals(jnp.bfloat16, remat, policy) == _saved_residuals(
            jnp.float32, remat, policy), (remat, policy)
    assert (_saved_residuals(jnp.bfloat16, True, "full")
            < _saved_residuals(jnp.bfloat16, True, "dots")
            == _saved_residuals(jnp.bfloat16, False, "full"))
