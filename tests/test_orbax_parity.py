"""Orbax checkpoints: parity with DeepMind's `gemma` (reference env) and the loader's contract.

The parity tests run tests/reference/make_gemma_reference.py in .venv-ref (Python 3.12 with
`gemma`, made by scripts/setup_reference_env.sh): gemma writes tiny Gemma 2 / Gemma 3 checkpoints
in the NESTED, FLAT and STACKED layouts plus its own logits, and our loader + model must agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO

from kaggle_pipeline.checkpoints.common import CheckpointError, expected_shapes, flatten
from kaggle_pipeline.checkpoints.orbax_format import (
    infer_config,
    load_orbax,
    save_orbax,
    to_flat_layout,
)
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import PRESETS, AttentionKind, ModelConfig, tiny_config

PROJECT = REPO
REFERENCE_VENV = Path(os.environ.get("REFERENCE_VENV", PROJECT / ".venv-ref"))
SETUP_SCRIPT = PROJECT / "scripts" / "setup_reference_env.sh"
CASES = ("gemma2_gqa", "gemma2_qkv", "gemma3_gqa", "gemma3_mqa")
LAYOUTS = ("nested", "flat", "stacked")
MAX_RELATIVE_ERROR = 1e-5


def _reference_python() -> Path:
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"the reference env {REFERENCE_VENV} is missing: CI must run "
                        f"`bash scripts/setup_reference_env.sh` before pytest")
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True)
    return python


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma_reference")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [str(_reference_python()), str(PROJECT / "tests" / "reference" / "make_gemma_reference.py"),
         str(out)], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        pytest.fail(f"make_gemma_reference.py failed ({run.returncode}):\n{run.stderr[-4000:]}")
    print(run.stdout, json.loads((out / "versions.json").read_text()))
    return out


def _model_config(fields: dict) -> ModelConfig:
    kinds = tuple(AttentionKind(k) for k in fields["attention_kinds"])
    fields = dict(fields, attention_kinds=kinds)
    return ModelConfig(**fields)


def _logits(config: ModelConfig, params: dict, ref) -> np.ndarray:
    logits, _ = Transformer(config).apply({"params": params}, jnp.asarray(ref["tokens"]),
                                          jnp.asarray(ref["positions"]),
                                          jnp.asarray(ref["segment_ids"]))
    return np.asarray(logits)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_gemma_in_every_layout(reference_dir, case):
    config = _model_config(json.loads((reference_dir / case / "config.json").read_text()))
    ref = np.load(reference_dir / case / "reference.npz")
    assert len(set(config.attention_kinds)) == 2 and ref["tokens"].shape[1] > config.sliding_window

    loaded = {layout: load_orbax(reference_dir / case / layout, config)[1] for layout in LAYOUTS}
    nested = flatten(loaded["nested"])
    for layout in ("flat", "stacked"):
        other = flatten(loaded[layout])
        assert other.keys() == nested.keys(), layout
        for name, value in nested.items():
            np.testing.assert_array_equal(other[name], value, err_msg=f"{layout}: {name}")

    logits = _logits(config, loaded["nested"], ref)
    valid = ref["segment_ids"] != 0  # gemma lets padding queries see real tokens; we don't
    error = np.abs(logits - ref["logits"])[valid].max() / np.abs(ref["logits"][valid]).max()
    print(f"{case}: max |ours - gemma| / max |gemma| = {error:.2e}")
    assert error <= MAX_RELATIVE_ERROR


def test_presets_equal_gemma_presets(reference_dir):
    official = json.loads((reference_dir / "official_configs.json").read_text())
    assert set(official) <= set(PRESETS)
    for name, fields in official.items():
        ours, theirs = PRESETS[name], _model_config(fields)
        diff = {f.name: (getattr(ours, f.name), getattr(theirs, f.name))
                for f in dataclasses.fields(ModelConfig)
                if getattr(ours, f.name) != getattr(theirs, f.name)}
        assert not diff, f"{name}: (ours, gemma's) {diff}"


def _restore_raw(path: Path) -> dict:
    """The checkpoint's tree as saved, as numpy arrays."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def test_save_orbax_flat_equals_gemma_flat(reference_dir, tmp_path):
    """Our FLAT writer gives gemma's own FLAT tree: same keys, shapes, dtypes and values."""
    for case in ("gemma2_qkv", "gemma3_gqa"):
        config = _model_config(json.loads((reference_dir / case / "config.json").read_text()))
        _, params = load_orbax(reference_dir / case / "nested", config)
        ours = flatten(_restore_raw(save_orbax(params, tmp_path / case)))
        theirs = flatten(_restore_raw(reference_dir / case / "flat"))
        assert ours.keys() == theirs.keys()
        assert any(k.startswith("transformer/layer_0/mlp/gating_einsum") for k in ours)
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype, key
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


# ---------------------------------------------------------------- no reference env needed ---


def _random_params(config: ModelConfig, seed: int) -> dict:
    """Random params of the model's shapes, norm scales included (drawn by numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype),
                        abstract_params(config))


def _write_tree(path: Path, tree: dict) -> None:
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, tree)


def _assert_same_params(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("config", [tiny_config("gemma2"),
                                    tiny_config("gemma3", num_layers=7, num_kv_heads=4)],
                         ids=["gemma2-gqa", "gemma3-qkv"])
def test_save_load_round_trip(tmp_path, config, layout):
    params = _random_params(config, 0)
    path = save_orbax(params, tmp_path / "ckpt", layout=layout)
    loaded_config, loaded = load_orbax(path, config)
    assert loaded_config is config
    _assert_same_params(loaded, params)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging dir left behind


def test_save_replaces_existing_checkpoint_and_loads_in_dtype(tmp_path):
    config = tiny_config("gemma2")
    first, second = _random_params(config, 0), _random_params(config, 1)
    save_orbax(first, tmp_path / "ckpt")
    save_orbax(second, tmp_path / "ckpt")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params(config))
    _, loaded = load_orbax(tmp_path / "ckpt", config, dtype=jnp.bfloat16, shardings=shardings)
    assert {v.dtype for v in flatten(loaded).values()} == {jnp.dtype(jnp.bfloat16)}
    assert all(v.sharding == device for v in flatten(loaded).values())
    _assert_same_params(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), second))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_in_bfloat16_as_published(tmp_path):
    config = tiny_config("gemma3")
    params = _random_params(config, 0)
    raw = flatten(_restore_raw(save_orbax(params, tmp_path / "ckpt", dtype=jnp.bfloat16)))
    assert "transformer/embedder/input_embedding" in raw
    assert "transformer/layer_0/mlp/linear/w" in raw
    assert {v.dtype for v in raw.values()} == {jnp.dtype(jnp.bfloat16)}


def test_finds_kaggle_folder_and_default_item_dir(tmp_path):
    config = tiny_config("gemma2")
    params = _random_params(config, 0)
    # Kaggle: <version dir>/gemma2-2b-it/{_METADATA,...} next to tokenizer.model.
    save_orbax(params, tmp_path / "kaggle" / "gemma2-tiny-it")
    (tmp_path / "kaggle" / "tokenizer.model").write_bytes(b"not read here")
    _assert_same_params(load_orbax(tmp_path / "kaggle", config)[1], params)
    # Orbax CheckpointManager / Kauldron step: <step>/default/.
    save_orbax(params, tmp_path / "step_100" / "default", layout="nested")
    _assert_same_params(load_orbax(tmp_path / "step_100", config)[1], params)

    save_orbax(params, tmp_path / "kaggle" / "another")
    with pytest.raises(CheckpointError, match="several checkpoints.*another, gemma2-tiny-it"):
        load_orbax(tmp_path / "kaggle", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no Orbax checkpoint"):
        load_orbax(tmp_path / "empty", config)
    with pytest.raises(CheckpointError, match="not found: .*missing"):
        load_orbax(tmp_path / "missing", config)


def test_wrapped_and_multimodal_checkpoints_load_the_text_model(tmp_path):
    config = tiny_config("gemma3")
    params = jax.tree.map(np.asarray, _random_params(config, 0))
    kauldron_state = {"params": params, "step": np.int64(7), "opt_state": {"count": np.int32(7)}}
    # Gemma 3 4B+ checkpoints also hold the vision encoder and its projection into the embedder.
    multimodal = to_flat_layout(params) | {
        "transformer/embedder/mm_input_projection": {"w": np.ones((8, 32), np.float32)},
        "transformer/embedder/mm_soft_embedding_norm": {"scale": np.ones(8, np.float32)},
        "SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": np.ones((2, 8), np.float32)},
    }
    trees = {"kauldron": kauldron_state, "under_transformer": {"transformer": params},
             "multimodal": multimodal}
    for name, tree in trees.items():
        _write_tree(tmp_path / name, tree)
        _assert_same_params(load_orbax(tmp_path / name, config)[1], params)


def test_wrong_shape_names_the_weight(tmp_path):
    config = tiny_config("gemma2")
    tree = to_flat_layout(jax.tree.map(np.asarray, _random_params(config, 0)))
    tree["transformer/layer_1/attn/q_einsum"]["w"] = np.zeros((4, 32, 8), np.float32)
    _write_tree(tmp_path / "ckpt", tree)
    with pytest.raises(CheckpointError) as error:
        load_orbax(tmp_path / "ckpt", config)
    message = str(error.value)
    assert str(tmp_path / "ckpt") in message
    assert "'layer_1/attn/q_einsum/w' has shape (4, 32, 8)" in message
    assert "expects (4, 32, 16)" in message


def test_missing_weight_names_the_weight(tmp_path):
    config = tiny_config("gemma2")
    tree = to_flat_layout(jax.tree.map(np.asarray, _random_params(config, 0)))
    del tree["transformer/layer_2/mlp/linear"]
    _write_tree(tmp_path / "ckpt", tree)
    with pytest.raises(CheckpointError, match=r"missing weight for 'layer_2/mlp/linear' "
                                              r"\(expected shape \(64, 32\)\)"):
        load_orbax(tmp_path / "ckpt", config)


def test_weights_the_config_lacks_are_an_error(tmp_path):
    params = _random_params(tiny_config("gemma2", num_layers=6), 0)
    save_orbax(params, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="'layer_4/.*' is not part of the config.*4 layers"):
        load_orbax(tmp_path / "ckpt", tiny_config("gemma2", num_layers=4))


def test_config_inferred_from_shapes_or_asked_for(tmp_path):
    for name in ("gemma2-2b", "gemma3-270m"):
        assert infer_config(expected_shapes(PRESETS[name])) is PRESETS[name]
    save_orbax(_random_params(tiny_config("gemma3"), 0), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="match no known Gemma preset.*vocab_size=128, "
                                              "embed_dim=32, num_layers=4.*pass config="):
        load_orbax(tmp_path / "ckpt")


def test_not_a_gemma_checkpoint(tmp_path):
    _write_tree(tmp_path / "ckpt", {"encoder": {"w": np.zeros(3, np.float32)}})
    with pytest.raises(CheckpointError, match="no 'embedder/input_embedding' weight"):
        load_orbax(tmp_path / "ckpt", tiny_config("gemma2"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
