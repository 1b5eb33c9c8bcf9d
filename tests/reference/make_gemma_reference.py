"""Writes reference checkpoints and logits with DeepMind's `gemma` library (runs in .venv-ref).

    .venv-ref/bin/python tests/reference/make_gemma_reference.py OUT_DIR

For each tiny case, cut from an official `gm.nn` preset (so every flag but the sizes is the
official one), OUT_DIR/<case>/ gets:
  nested/   params saved by `gm.ckpts.save_params` (the NESTED layout)
  flat/     the FLAT layout of the published Kaggle/DeepMind checkpoints (`transformer/...` keys)
  stacked/  the STACKED layout (`transformer/stacked_layers/attention_type_i/...`)
  reference.npz  tokens, positions, segment_ids (0 = padding) and `gm.nn.Transformer` f32 logits
  config.json    the case as kaggle_pipeline ModelConfig field values
OUT_DIR/official_configs.json holds the full-size `gm.nn` presets as ModelConfig field values.

Every layout is read back with `gm.ckpts.load_params` before it is used, so the files are ones
gemma itself recognises. This script imports nothing from kaggle_pipeline: it is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gemma import gm
from gemma.gm.ckpts import _checkpoint
from gemma.gm.nn import config as gm_config

LOCAL = gm.nn.AttentionType.LOCAL_SLIDING
GLOBAL = gm.nn.AttentionType.GLOBAL
GEMMA2_PATTERN = (LOCAL, GLOBAL)
GEMMA3_PATTERN = gm_config.GEMMA3_ATTENTION_PATTERN

BATCH, SEQ_LEN, PAD = 2, 20, 5  # row 1 ends with PAD padding tokens; SEQ_LEN > every window
TINY = dict(num_embed=128, embed_dim=32, hidden_dim=64, head_dim=16, sliding_window_size=8)


def _tiny(preset, family, pattern, num_layers, **changes):
    config = dataclasses.replace(
        preset.config, **TINY, vision_encoder=None,
        attention_types=gm_config.make_attention_layers_types(pattern, num_layers=num_layers),
        **changes)
    return family, config


# Local and global layers in each; sequence longer than the window; GQA, MQA and fused qkv.
CASES = {
    # Gemma 2 2B maths: softcaps, 1/sqrt(head_dim) query scale, GQA.
    "gemma2_gqa": _tiny(gm.nn.Gemma2_2B, "gemma2", GEMMA2_PATTERN, 4, num_heads=4, num_kv_heads=2),
    # Gemma 2 27B maths (query scale from embed_dim / num_heads, transposed gating), and
    # num_kv_heads == num_heads, for which the official layout fuses q, k, v into `qkv_einsum`.
    "gemma2_qkv": _tiny(gm.nn.Gemma2_27B, "gemma2", GEMMA2_PATTERN, 4, num_heads=4,
                        num_kv_heads=4),
    # Gemma 3 4B maths (QK-norm, two RoPE bases, global RoPE scale 8), 7 layers: the 5+1
    # pattern and a partial repeat.
    "gemma3_gqa": _tiny(gm.nn.Gemma3_4B, "gemma3", GEMMA3_PATTERN, 7, num_heads=4,
                        num_kv_heads=2),
    # Gemma 3 270M maths: multi-query attention (one kv head).
    "gemma3_mqa": _tiny(gm.nn.Gemma3_270M, "gemma3", GEMMA3_PATTERN, 7, num_heads=4,
                        num_kv_heads=1),
}

OFFICIAL = {
    "gemma2-2b": ("gemma2", gm.nn.Gemma2_2B), "gemma2-9b": ("gemma2", gm.nn.Gemma2_9B),
    "gemma2-27b": ("gemma2", gm.nn.Gemma2_27B), "gemma3-270m": ("gemma3", gm.nn.Gemma3_270M),
    "gemma3-1b": ("gemma3", gm.nn.Gemma3_1B), "gemma3-4b": ("gemma3", gm.nn.Gemma3_4B),
    "gemma3-12b": ("gemma3", gm.nn.Gemma3_12B), "gemma3-27b": ("gemma3", gm.nn.Gemma3_27B),
}


def model_config_fields(family: str, config) -> dict:
    """gemma's TransformerConfig as kaggle_pipeline ModelConfig field values."""
    # Our model always has the post-attention and post-ffw norms, as Gemma 2 and 3 do.
    assert config.use_post_attn_norm and config.use_post_ffw_norm
    return dict(
        family=family,
        vocab_size=config.num_embed,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        attention_kinds=["local" if t == LOCAL else "global" for t in config.attention_types],
        sliding_window=config.sliding_window_size,
        query_pre_attn_scalar=float(config.query_pre_attn_scalar()),
        attn_logit_softcap=config.attn_logits_soft_cap,
        final_logit_softcap=config.final_logit_softcap,
        use_qk_norm=config.use_qk_norm,
        transpose_gating_einsum=config.transpose_gating_einsum,
        local_rope_base=float(config.local_base_frequency),
        global_rope_base=float(config.global_base_frequency),
        local_rope_scale=float(config.local_scale_factor),
        global_rope_scale=float(config.global_scale_factor),
        norm_eps=1e-6,  # gm.nn.RMSNorm hard-codes it
    )


def random_params(model, tokens, seed: int) -> dict:
    """Params with every leaf random, norm scales included (init leaves those at zero).

    Only the shapes come from `model.init` (traced, not compiled: XLA takes ~30 s to compile
    the init of even this tiny model on CPU); the values are drawn with numpy.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), tokens))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        std = 1.0 if "input_embedding" in name else 0.5 if "scale" in name else 0.2
        return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree.map_with_path(draw, shapes)


def inputs(vocab_size: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (BATCH, SEQ_LEN), dtype=np.int32)
    segment_ids = np.ones((BATCH, SEQ_LEN), np.int32)
    tokens[1, -PAD:] = 0
    segment_ids[1, -PAD:] = 0
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)).copy()
    return tokens, positions, segment_ids


def assert_same(a, b, what: str) -> None:
    fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb], f"{what}: tree structure differs"
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def write_case(out: Path, name: str, family: str, config, seed: int) -> None:
    out.mkdir(parents=True)
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)
    tokens, positions, segment_ids = inputs(config.num_embed, seed)
    params = random_params(model, jnp.asarray(tokens), seed)

    gm.ckpts.save_params(params, out / "nested", wait_until_finished=True)
    # How gemma itself remaps NESTED params to the published layouts (`load_params` inverts it).
    flat = _checkpoint._nested_to_flat(params)
    assert all(k.startswith("transformer/") for k in flat), sorted(flat)
    gm.ckpts.save_params(flat, out / "flat", wait_until_finished=True)
    stacked = _checkpoint._nested_to_stacked(params, attn_pattern_len=len(
        GEMMA2_PATTERN if family == "gemma2" else GEMMA3_PATTERN))
    assert any(k.startswith("transformer/stacked_layers/") for k in stacked), sorted(stacked)
    gm.ckpts.save_params(stacked, out / "stacked", wait_until_finished=True)
    for layout in ("nested", "flat", "stacked"):
        restored = gm.ckpts.load_params(out / layout)
        assert_same(restored, params, f"{name}/{layout}")

    # Explicit positions and mask: causal, padding keys hidden (what our segment_ids express).
    causal = np.tril(np.ones((SEQ_LEN, SEQ_LEN), bool))
    mask = causal[None] & (segment_ids[:, None, :] != 0)
    logits = model.apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions),
                         attention_mask=jnp.asarray(mask)).logits
    logits = np.asarray(logits, np.float32)
    assert np.isfinite(logits).all()
    np.savez(out / "reference.npz", tokens=tokens, positions=positions, segment_ids=segment_ids,
             logits=logits)
    (out / "config.json").write_text(json.dumps(model_config_fields(family, config), indent=1))
    print(f"{name}: {len(jax.tree.leaves(params))} tensors, logits {logits.shape}, "
          f"|logits| max {np.abs(logits).max():.3f}")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, (family, config)) in enumerate(CASES.items()):
        write_case(out / name, name, family, config, seed)
    official = {name: model_config_fields(family, cls.config)
                for name, (family, cls) in OFFICIAL.items()}
    (out / "official_configs.json").write_text(json.dumps(official, indent=1))
    import gemma
    (out / "versions.json").write_text(json.dumps(
        {"gemma": gemma.__version__, "jax": jax.__version__}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
