"""Hugging Face checkpoints: our logits equal transformers' on the same safetensors, both ways."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from kaggle_pipeline.checkpoints import load_checkpoint
from kaggle_pipeline.checkpoints.common import flatten
from kaggle_pipeline.checkpoints.hf_format import config_from_hf, save_hf
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import PRESETS, AttentionKind, tiny_config

SEQ_LEN = 24
REAL_LENGTHS = (SEQ_LEN, 17)  # the second row is right-padded

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, head_dim=8,
             num_attention_heads=4, rms_norm_eps=1e-6)
HF_CONFIGS = {
    # Soft-caps small enough to bite on random weights; query scale not 1/sqrt(head_dim).
    "gemma2-gqa": transformers.Gemma2Config(
        **SMALL, num_hidden_layers=4, num_key_value_heads=2, sliding_window=5,
        query_pre_attn_scalar=12, attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
    "gemma2-mha": transformers.Gemma2Config(
        **SMALL, num_hidden_layers=3, num_key_value_heads=4, sliding_window=7,
        query_pre_attn_scalar=8),
    # 7 layers: five local, one global, one local; linear rope scaling on the global layer.
    "gemma3-gqa": transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=7, num_key_value_heads=2, sliding_window=6,
        query_pre_attn_scalar=20, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gemma3-mha": transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=6, num_key_value_heads=4, sliding_window=4,
        query_pre_attn_scalar=8),
}
TORCH_MODEL = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}


def _random_hf_model(name: str):
    hf_config = HF_CONFIGS[name]
    hf_config._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, name)))
    model = TORCH_MODEL[name.split("-")[0]](hf_config).eval()
    with torch.no_grad():  # every weight random, norms included, so no mapping hides behind 0
        for param_name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in param_name else 0.2)
    return model


def _batch(vocab_size: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab_size, (len(REAL_LENGTHS), SEQ_LEN))
    segment_ids = (np.arange(SEQ_LEN)[None] < np.array(REAL_LENGTHS)[:, None]).astype(np.int32)
    tokens = np.where(segment_ids == 1, tokens, 0)
    return tokens, segment_ids


def _torch_logits(model, tokens, segment_ids) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens),
                    attention_mask=torch.from_numpy(segment_ids))
    return out.logits.float().numpy()


def _our_logits(config, params, tokens, segment_ids) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    apply = jax.jit(Transformer(config).apply)  # one compile instead of one per op
    logits, _ = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                      jnp.asarray(segment_ids))
    return np.asarray(logits)


def _relative_error(ours, ref, segment_ids) -> float:
    real = segment_ids.astype(bool)
    return float(np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf_model = _random_hf_model(name)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = load_checkpoint(tmp_path)

    hf_config = HF_CONFIGS[name]
    assert config.family == name.split("-")[0]
    assert config.use_qkv_einsum == (hf_config.num_key_value_heads == hf_config.num_attention_heads)
    assert set(flatten(params)) >= {"layer_0/attn/qkv_einsum/w" if config.use_qkv_einsum
                                    else "layer_0/attn/kv_einsum/w"}
    kinds = ["sliding_attention" if k == AttentionKind.LOCAL else "full_attention"
             for k in config.attention_kinds]
    assert kinds == hf_config.layer_types

    tokens, segment_ids = _batch(config.vocab_size)
    ref = _torch_logits(hf_model, tokens, segment_ids)
    ours = _our_logits(config, params, tokens, segment_ids)
    assert _relative_error(ours, ref, segment_ids) <= 1e-5

    # The sequence is longer than the window, so a window off by one must show.
    shifted = config.replace(sliding_window=config.sliding_window + 1)
    assert _relative_error(_our_logits(shifted, params, tokens, segment_ids), ref,
                           segment_ids) > 1e-3


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_save_hf_round_trip_through_transformers(family, tmp_path):
    config = tiny_config(family, num_layers=6, sliding_window=5, vocab_size=80)
    if family == "gemma3":
        config = config.replace(global_rope_scale=8.0)
    # Every param random (norm scales start at 0), so no mapping hides behind a zero.
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                          abstract_params(config))

    save_hf(params, config, tmp_path, dtype=jnp.float32)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf_model) is TORCH_MODEL[family]
    tokens, segment_ids = _batch(config.vocab_size)
    ref = _torch_logits(hf_model, tokens, segment_ids)
    ours = _our_logits(config, params, tokens, segment_ids)
    assert _relative_error(ours, ref, segment_ids) <= 1e-5

    loaded_config, loaded = load_checkpoint(tmp_path)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    # bf16 export: the file holds exactly the bf16-rounded weights.
    save_hf(params, config, tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == jnp.bfloat16
    _, loaded = load_checkpoint(tmp_path / "bf16")
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, rounded)


# config.json text of released checkpoints, as transformers 4.x wrote them (fields that matter).
RELEASED_CONFIGS = {
    "gemma2-2b": ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                   "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
                   "intermediate_size": 9216, "num_attention_heads": 8, "num_hidden_layers": 26,
                   "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                   "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000},
                  256_000),
    "gemma2-27b": ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                    "head_dim": 128, "hidden_size": 4608, "intermediate_size": 36864,
                    "num_attention_heads": 32, "num_hidden_layers": 46,
                    "num_key_value_heads": 16, "query_pre_attn_scalar": 144,
                    "sliding_window": 4096, "vocab_size": 256000}, 256_000),
    "gemma3-270m": ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                     "_sliding_window_pattern": 6, "head_dim": 256, "hidden_size": 640,
                     "intermediate_size": 2048, "num_attention_heads": 4,
                     "num_hidden_layers": 18, "num_key_value_heads": 1,
                     "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
                     "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
                     "vocab_size": 262144}, 262_144),
    # The multimodal config leaves most text fields to Gemma3TextConfig's defaults.
    "gemma3-4b": ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                   "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                   "model_type": "gemma3_text", "num_hidden_layers": 34,
                                   "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                   "sliding_window": 1024}}, 262_208),
}


@pytest.mark.parametrize("name", list(RELEASED_CONFIGS))
def test_released_config_json_gives_the_preset(name):
    hf, vocab_size = RELEASED_CONFIGS[name]
    assert config_from_hf(hf) == PRESETS[name].replace(vocab_size=vocab_size)


def test_multimodal_prefix_and_sharded_index_load_the_same_params(tmp_path):
    """Gemma3ForConditionalGeneration keeps the text model under model.language_model. next to
    a vision tower; big checkpoints come in shards listed by model.safetensors.index.json."""
    config = tiny_config("gemma3", num_layers=2, sliding_window=4, vocab_size=40)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                          abstract_params(config))
    save_hf(params, config, tmp_path / "plain", dtype=jnp.float32)
    plain_config = json.loads((tmp_path / "plain" / "config.json").read_text())
    with safe_open(tmp_path / "plain" / "model.safetensors", framework="numpy") as f:
        tensors = {k.replace("model.", "model.language_model.", 1): f.get_tensor(k)
                   for k in f.keys()}
    tensors["model.vision_tower.patch_embedding.weight"] = np.ones((4, 3), np.float32)

    multimodal = tmp_path / "multimodal"
    multimodal.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, multimodal / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (multimodal / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    (multimodal / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": plain_config, "vision_config": {"model_type": "siglip_vision_model"}}))

    loaded_config, loaded = load_checkpoint(multimodal)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
