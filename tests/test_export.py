"""Export: a trained adapter loads into PEFT and a merged checkpoint into transformers with our
logits; Orbax merged export and our own adapter directory round-trip."""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

from kaggle_pipeline.checkpoints.adapter import load_adapter, save_adapter
from kaggle_pipeline.checkpoints.common import CheckpointError
from kaggle_pipeline.checkpoints.hf_format import load_hf
from kaggle_pipeline.checkpoints.orbax_format import load_orbax
from kaggle_pipeline.checkpoints.peft import export_merged, export_peft_adapter
from kaggle_pipeline.data.packing import batches, pack
from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import tiny_config
from kaggle_pipeline.model.lora import (
    ATTENTION_TARGETS,
    MLP_TARGETS,
    LoraConfig,
    init_lora,
    merge_lora,
)
from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row
from kaggle_pipeline.model.sharding import make_mesh
from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
from kaggle_pipeline.training.step import Trainer

ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
SEQ_LEN = 16
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, head_dim=8,
             num_attention_heads=4, num_hidden_layers=3, rms_norm_eps=1e-6)
HF_MODELS = {
    # Gemma 2 with grouped kv heads; Gemma 3 with one kv head, like the 270M.
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **SMALL, num_key_value_heads=2, sliding_window=5, query_pre_attn_scalar=12,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **SMALL, num_key_value_heads=1, sliding_window=6, query_pre_attn_scalar=20)),
}


def _hf_checkpoint(family: str, directory):
    """A transformers-written checkpoint with every weight random (norms too)."""
    model_class, hf_config = HF_MODELS[family]
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in name else 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _train_adapter(config, params, lora_config, steps: int = 4) -> dict:
    """A few real LoRA steps, so every B is non-zero and shaped by gradients."""
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(16):
        n = int(rng.integers(4, SEQ_LEN))
        examples.append((rng.integers(3, config.vocab_size, n), np.arange(n) >= n // 2))
    rows, _ = pack(examples, SEQ_LEN)
    trainer = Trainer(Transformer(config, lora_scale=lora_config.scale),
                      make_optimizer(OptimConfig(learning_rate=0.05), steps),
                      make_mesh(devices=jax.devices()[:1]), "lora")
    state = trainer.init_state(init_lora(config, lora_config, jax.random.key(1)))
    step = trainer.compile_step(state, params)
    for batch in list(batches(rows, 4, seed=0, epoch=0))[:steps]:
        state, _ = step(state, params,
                        trainer.put_batch(add_target_slots(batch, max_targets_per_row(rows))))
    return jax.device_get(state["trainable"])


def _batch(vocab_size: int):
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, vocab_size, (2, SEQ_LEN)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    segment_ids[1, 11:] = 0  # right-padded second row
    return np.where(segment_ids == 1, tokens, 0), segment_ids


def _our_logits(config, variables, lora_scale, tokens, segment_ids) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    apply = jax.jit(Transformer(config, lora_scale=lora_scale).apply)
    return np.asarray(apply(variables, tokens, positions, segment_ids)[0])


def _torch_logits(model, tokens, segment_ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long(),
                     attention_mask=torch.from_numpy(segment_ids).long()).logits.float().numpy()


def _rel_err(ours, ref, segment_ids) -> float:
    real = segment_ids.astype(bool)
    return float(np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])))


@pytest.mark.parametrize("family", list(HF_MODELS))
def test_trained_adapter_loads_in_peft_and_merged_export_in_transformers(family, tmp_path):
    hf_model = _hf_checkpoint(family, tmp_path / "base")
    config, params = load_hf(tmp_path / "base")
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    lora = _train_adapter(config, params, lora_config)
    assert all(np.abs(leaf).min() > 0 for leaf in jax.tree.leaves(lora))  # B trained too

    tokens, segment_ids = _batch(config.vocab_size)
    base = _torch_logits(hf_model, tokens, segment_ids)
    ours = _our_logits(config, {"params": params, "lora": lora}, lora_config.scale, tokens,
                       segment_ids)
    assert _rel_err(ours, base, segment_ids) > 1e-2  # the adapter changes the model

    out = export_peft_adapter(lora, lora_config, config, tmp_path / "peft", "tiny-base")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert {k: adapter_config[k] for k in ("peft_type", "task_type", "r", "lora_alpha",
                                           "lora_dropout", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "base_model_name_or_path": "tiny-base"}
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]
    with safe_open(out / "adapter_model.safetensors", framework="numpy") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert len(shapes) == config.num_layers * len(ALL_TARGETS) * 2
    q = "base_model.model.model.layers.2.self_attn.q_proj"
    assert shapes[q + ".lora_A.weight"] == [4, config.embed_dim]
    assert shapes[q + ".lora_B.weight"] == [config.num_heads * config.head_dim, 4]
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    assert shapes[o + ".lora_A.weight"] == [4, config.num_heads * config.head_dim]
    assert shapes[o + ".lora_B.weight"] == [config.embed_dim, 4]
    assert not list(tmp_path.glob(".peft*"))  # the temp dir was renamed away

    peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
    assert _rel_err(ours, _torch_logits(peft_model, tokens, segment_ids), segment_ids) <= 1e-5

    merged_dir = export_merged(params, lora, config, lora_config, tmp_path / "merged",
                               dtype=jnp.float32)
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(merged_model) is HF_MODELS[family][0]
    assert _rel_err(ours, _torch_logits(merged_model, tokens, segment_ids), segment_ids) <= 1e-5


@pytest.mark.parametrize("last_layers", [0, 1])
def test_adapter_for_multimodal_gemma3_adapts_only_the_language_model(tmp_path, last_layers):
    text = transformers.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 2},
                                         num_key_value_heads=1, sliding_window=6)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    hf_config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=1,
        boi_token_index=93, eoi_token_index=94, image_token_index=95)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(1)
    hf_model = transformers.Gemma3ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.2)
    hf_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    config, params = load_hf(tmp_path / "base")
    lora_config = LoraConfig(rank=2, alpha=4.0, targets=ALL_TARGETS, last_layers=last_layers)
    lora = _random_lora(config, lora_config)

    out = export_peft_adapter(lora, lora_config, config, tmp_path / "peft",
                              layers_prefix="model.language_model.")
    peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
    adapted = {name for name, module in peft_model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    layers = lora_config.layers(config.num_layers)
    assert len(adapted) == len(layers) * len(ALL_TARGETS)
    assert all(".language_model.layers." in name for name in adapted)  # vision q_proj untouched
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in adapted} == set(layers)

    tokens, segment_ids = _batch(90)
    ours = _our_logits(config, {"params": params, "lora": lora}, lora_config.scale, tokens,
                       segment_ids)
    assert _rel_err(ours, _torch_logits(peft_model, tokens, segment_ids), segment_ids) <= 1e-5


def test_adapter_of_the_last_layers_loads_in_peft_with_layers_to_transform(tmp_path):
    hf_model = _hf_checkpoint("gemma3", tmp_path / "base")
    config, params = load_hf(tmp_path / "base")
    lora_config = LoraConfig(rank=2, alpha=4.0, targets=ALL_TARGETS, last_layers=2)
    lora = _random_lora(config, lora_config)
    assert sorted(lora) == ["layer_1", "layer_2"]  # of 3
    out = export_peft_adapter(lora, lora_config, config, tmp_path / "peft")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["layers_to_transform"] == [1, 2]
    peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
    adapted = {name.split(".layers.")[1].split(".")[0] for name, module
               in peft_model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert adapted == {"1", "2"}
    tokens, segment_ids = _batch(config.vocab_size)
    ours = _our_logits(config, {"params": params, "lora": lora}, lora_config.scale, tokens,
                       segment_ids)
    assert _rel_err(ours, _torch_logits(peft_model, tokens, segment_ids), segment_ids) <= 1e-5
    # Our adapter files keep it: read back, the same layers and config.
    save_adapter(lora, lora_config, tmp_path / "ours")
    tree, read = load_adapter(tmp_path / "ours", config)
    assert sorted(tree) == ["layer_1", "layer_2"] and read == lora_config
    save_adapter(lora, dataclasses.replace(lora_config, last_layers=1), tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"bad/lora.safetensors: LoRA tree: factors for "
                                              r"layers \[1\], but the LoRA config adapts the "
                                              "last 1 layers only"):
        load_adapter(tmp_path / "bad", config)


def _random_lora(config, lora_config, seed: int = 0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), dtype),
                        init_lora(config, lora_config, jax.random.key(0)))


def test_merged_orbax_export_holds_the_merged_params(tmp_path):
    config = tiny_config("gemma3", num_layers=2, num_kv_heads=4)  # fused qkv_einsum
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32),
                          abstract_params(config))
    lora_config = LoraConfig(rank=2, alpha=4.0, targets=ALL_TARGETS)
    lora = _random_lora(config, lora_config)

    out = export_merged(params, lora, config, lora_config, tmp_path / "model", fmt="orbax",
                        dtype=jnp.float32)
    _, loaded = load_orbax(out, config)
    jax.tree.map(np.testing.assert_array_equal, loaded,
                 merge_lora(params, lora, config, lora_config))
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        export_merged(params, lora, config, lora_config, tmp_path / "x", fmt="gguf")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_and_load_adapter_round_trip(dtype, tmp_path):
    config = tiny_config("gemma2", num_layers=2)
    lora_config = LoraConfig(rank=3, alpha=5.0, dropout=0.1, targets=("q", "v", "down"))
    lora = _random_lora(config, lora_config, dtype=dtype)

    path = save_adapter(lora, lora_config, tmp_path / "adapter")
    loaded, loaded_config = load_adapter(path, config)
    assert loaded_config == lora_config
    assert jax.tree.structure(loaded) == jax.tree.structure(lora)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # Saving again replaces the old adapter whole, leaving no temp dirs behind.
    save_adapter(jax.tree.map(lambda x: x + 1, lora), lora_config, path)
    again, _ = load_adapter(path)
    np.testing.assert_array_equal(np.asarray(again["layer_1"]["mlp"]["down"]["b"]),
                                  np.asarray(lora["layer_1"]["mlp"]["down"]["b"] + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_adapter_errors_name_the_file_and_field(tmp_path):
    config = tiny_config("gemma2", num_layers=2)
    lora_config = LoraConfig(rank=2, targets=("q", "o"))
    path = save_adapter(_random_lora(config, lora_config), lora_config, tmp_path / "adapter")

    with pytest.raises(ValueError, match=r"lora.safetensors: .*layer_0/attn/q/b has shape "
                                         r"\(2, 4, 16\), expected \(2, 4, 8\)"):
        load_adapter(path, config.replace(head_dim=8))
    with pytest.raises(CheckpointError, match="lora.safetensors"):
        load_adapter(tmp_path / "missing")

    config_file = path / "lora_config.json"
    good = json.loads(config_file.read_text())
    for field, value, message in [("rank", "two", "field 'rank' = 'two' is not int"),
                                  ("targets", ["q", "x"], "unknown LoRA targets"),
                                  ("format", "other", "field 'format' is 'other'")]:
        config_file.write_text(json.dumps({**good, field: value}))
        with pytest.raises(ValueError, match=f"lora_config.json: .*{message}"):
            load_adapter(path)
    config_file.write_text("{\n  oops")
    with pytest.raises(ValueError, match="lora_config.json: invalid JSON at line 2"):
        load_adapter(path)


def test_exports_refuse_a_tree_that_does_not_fit_the_configs(tmp_path):
    config = tiny_config("gemma2", num_layers=2)
    lora_config = LoraConfig(rank=2, targets=("q", "gate"))
    lora = _random_lora(config, lora_config)
    params = abstract_params(config)  # never reached: the checks come first

    partial = {"layer_0": lora["layer_0"]}
    with pytest.raises(ValueError, match=r"no factors for layers \[1\]"):
        export_peft_adapter(partial, lora_config, config, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"layer_0 adapts \['gate', 'q'\], the LoRA config "
                                         r"targets \['gate', 'q', 'v'\]"):
        export_merged(params, lora, config, LoraConfig(rank=2, targets=("q", "v", "gate")),
                      tmp_path / "merged")
    with pytest.raises(ValueError, match=r"layer_0/mlp/gate/b has shape \(2, 64\), "
                                         r"expected \(2, 96\)"):
        export_peft_adapter(lora, lora_config, config.replace(hidden_dim=96), tmp_path / "peft")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------- the command


def _tarr_slice(tmp_path, rows: int = 12):
    from kaggle_pipeline.run_config import PROJECT_DIR

    lines = (PROJECT_DIR / "data" / "tarr" / "train.tsv").read_text(encoding="utf-8")
    train_file = tmp_path / "train.tsv"
    train_file.write_text("".join(lines.splitlines(keepends=True)[:rows + 1]), encoding="utf-8")
    return train_file


def _tiny_hf(directory, config, tokenizer, seed: int = 0):
    from kaggle_pipeline.checkpoints import save_hf

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                          abstract_params(config))
    save_hf(params, config, directory, dtype=jnp.float32)
    tokenizer.save(directory / "tokenizer.model")
    return directory


def test_export_command_writes_peft_merged_hf_and_orbax_that_load_elsewhere(
        tmp_path, gemma3_tokenizer):
    from kaggle_pipeline import export, train
    from kaggle_pipeline.checkpoints import load_checkpoint

    config = tiny_config("gemma3", vocab_size=262_144)
    base = _tiny_hf(tmp_path / "base", config, gemma3_tokenizer)
    args = [f"model.checkpoint={base}", f"data.train={_tarr_slice(tmp_path)}", "data.test=",
            "data.seq_len=128", "data.batch_size=2", "train.max_steps=2", "train.predict=false",
            "optim.learning_rate=0.05", "lora.targets=q,v,down",
            f"output.dir={tmp_path / 'runs'}", "output.name=r"]
    assert train.main(args) == 0
    assert export.main([*args, "--dtype", "float32"]) == 0
    out = tmp_path / "runs" / "r" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["hf", "orbax", "peft"]
    assert sorted(p.name for p in (out / "hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"]
    assert sorted(p.name for p in (out / "orbax").iterdir()) == ["r", "tokenizer.model"]

    # Ours: the base with the trained adapter.
    _, params = load_checkpoint(base)
    lora, lora_config = load_adapter(tmp_path / "runs" / "r" / "adapter", config)
    tokens, segment_ids = _batch(config.vocab_size)
    ours = _our_logits(config, {"params": params, "lora": lora}, lora_config.scale, tokens,
                       segment_ids)
    plain = _our_logits(config, {"params": params}, 1.0, tokens, segment_ids)
    assert _rel_err(ours, plain, segment_ids) > 1e-3  # the adapter was trained

    adapter_config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(hf_base, out / "peft").eval()
    assert _rel_err(ours, _torch_logits(peft_model, tokens, segment_ids), segment_ids) <= 1e-5
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        out / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    assert _rel_err(ours, _torch_logits(merged, tokens, segment_ids), segment_ids) <= 1e-5
    _, orbax_params = load_orbax(out / "orbax", config)
    ours_orbax = _our_logits(config, {"params": orbax_params}, 1.0, tokens, segment_ids)
    assert _rel_err(ours, ours_orbax, segment_ids) <= 1e-5

    # bfloat16 by default for merged weights; what cannot be exported says so in one line.
    assert export.main([*args, "--format", "hf"]) == 0
    with safe_open(out / "hf" / "model.safetensors", framework="numpy") as f:
        key = next(iter(f.keys()))
        assert f.get_slice(key).get_dtype() == "BF16"
    assert export.main([*args, "--format", "gguf"]) == 2
    assert export.main([*args, "lora.enabled=false"]) == 2  # the run saved no full model


def test_full_fine_tuning_of_an_hf_gemma2_with_256000_rows_predicts_and_exports(
        tmp_path, gemma3_tokenizer, capsys):
    """Hugging Face's Gemma 2 checkpoints have 256000 embedding rows (the Orbax ones 256128): no
    known preset's shapes. The run saves its model config beside the weights."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from kaggle_pipeline import export, predict, train
    from kaggle_pipeline.checkpoints import load_checkpoint
    from kaggle_pipeline.data.tokenizer import Tokenizer

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(gemma3_tokenizer.serialized())
    del proto.pieces[256_000:]  # a tokenizer of Gemma 2's size
    proto.trainer_spec.vocab_size = 256_000
    config = tiny_config("gemma2", vocab_size=256_000)
    base = _tiny_hf(tmp_path / "gemma2", config, Tokenizer(proto))
    test_file = tmp_path / "test.tsv"
    test_file.write_text("id\tcomment\n7\t맛있어요\n8\t별로예요\n", encoding="utf-8")
    args = [f"model.checkpoint={base}", f"data.train={_tarr_slice(tmp_path)}",
            f"data.test={test_file}", "data.seq_len=128", "data.batch_size=2",
            "train.max_steps=1", "train.predict=false", "lora.enabled=false",
            f"output.dir={tmp_path / 'runs'}", "output.name=full",
            f"output.submissions={tmp_path / 'subs'}"]
    assert train.main(args) == 0
    run = tmp_path / "runs" / "full"
    saved = json.loads((run / "model_config.json").read_text())
    assert saved["vocab_size"] == 256_000 and saved["family"] == "gemma2"
    assert predict.main(args) == 0, capsys.readouterr().err
    (written,) = (tmp_path / "subs").iterdir()
    assert written.read_text().splitlines()[0] == "id\tcomment\tlabel"

    assert export.main(args) == 0
    out = run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["hf", "orbax"]  # no adapter to export
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert hf.config.vocab_size == 256_000
    _, trained = load_checkpoint(run / "model", config=config)
    _, exported = load_orbax(out / "orbax", config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a, np.float32).astype(jnp.bfloat16), np.asarray(b)), trained, exported)
    capsys.readouterr()
    assert export.main([*args, "--format", "peft"]) == 2
    assert "there is no adapter" in capsys.readouterr().err
