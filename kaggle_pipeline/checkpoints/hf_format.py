"""Hugging Face Gemma 2 / Gemma 3 checkpoints: config.json + safetensors <-> our config and params.

HF stores every projection as a torch Linear weight (out_features, in_features); the official
layout splits the heads out and fuses k/v (or q/k/v) and gate/up. Both apply RMSNorm weights as
(1 + w), so norms copy over unchanged. The GGUF loader reuses the same layout conversion, since
dequantized GGUF tensors come out in the HF orientation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.checkpoints.common import (
    CheckpointError,
    aligned_empty,
    build_params,
    flatten,
    read_into,
    require_file,
)
from kaggle_pipeline.files import write_atomically, write_text_atomically
from kaggle_pipeline.model.config import AttentionKind, ModelConfig, from_dimensions

# Where the text model's tensors live: Gemma3ForConditionalGeneration (transformers >= 4.52),
# the same before 4.52, then the plain *ForCausalLM models.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")

# Defaults of transformers' Gemma2Config / Gemma3TextConfig: the released multimodal Gemma 3
# config.json files leave most text fields out and rely on them.
_HF_DEFAULTS = {
    "gemma2": dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
    "gemma3": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=None, final_logit_softcapping=None,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
                   sliding_window_pattern=6, max_position_embeddings=131_072),
}
_FAMILY_OF_MODEL_TYPE = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_LAYER_KIND = {"sliding_attention": AttentionKind.LOCAL, "full_attention": AttentionKind.GLOBAL}

# Official norm name -> HF module name inside a decoder layer.
_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


# --- config.json ---------------------------------------------------------------------------


def _rope(params: Mapping | None, default_base: float, source: str, which: str,
          ) -> tuple[float, float]:
    """(base, linear scale) from one HF rope dict; other rope types change the maths: refuse."""
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", default_base))
    if rope_type == "default":
        return base, 1.0
    if rope_type == "linear":
        return base, float(params["factor"])
    raise CheckpointError(f"{source}: rope_type {rope_type!r} of the {which} layers is not "
                          "supported (only 'default' and 'linear')")


def _rope_pair(text: Mapping, family: str, source: str) -> tuple[tuple[float, float], ...]:
    """((local base, scale), (global base, scale)) from either config.json generation."""
    defaults = _HF_DEFAULTS[family]
    params = text.get("rope_parameters")
    if params and ("full_attention" in params or "sliding_attention" in params):
        # transformers >= 5, per layer type.
        local = _rope(params.get("sliding_attention"),
                      defaults.get("rope_local_base_freq", defaults["rope_theta"]), source, "local")
        return local, _rope(params.get("full_attention"), defaults["rope_theta"], source, "global")
    if params:  # transformers >= 5, one set for all layers
        both = _rope(params, defaults["rope_theta"], source, "all")
        return both, both
    # transformers 4.x: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq.
    global_params = {"rope_theta": text.get("rope_theta", defaults["rope_theta"]),
                     **(text.get("rope_scaling") or {})}
    global_rope = _rope(global_params, defaults["rope_theta"], source, "global")
    if family == "gemma2":
        return global_rope, global_rope
    local_base = text.get("rope_local_base_freq", defaults["rope_local_base_freq"])
    return (float(local_base), 1.0), global_rope


def _attention_kinds(text: Mapping, family: str, num_layers: int, source: str,
                     ) -> tuple[AttentionKind, ...]:
    layer_types = text.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for "
                                  f"num_hidden_layers={num_layers}")
        unknown = sorted(set(layer_types) - set(_LAYER_KIND))
        if unknown:
            raise CheckpointError(f"{source}: unsupported layer_types {unknown}")
        return tuple(_LAYER_KIND[t] for t in layer_types)
    # Same rule as transformers: layer i is global when (i + 1) % pattern == 0.
    pattern = 2 if family == "gemma2" else text.get(
        "sliding_window_pattern", text.get("_sliding_window_pattern", 6))
    return tuple(AttentionKind.GLOBAL if (i + 1) % pattern == 0 else AttentionKind.LOCAL
                 for i in range(num_layers))


def config_from_hf(hf: Mapping, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Gemma2ForCausalLM / Gemma3ForCausalLM / Gemma3ForConditionalGeneration
    config.json (the text part of the latter)."""
    text = hf.get("text_config") or hf
    model_type = text.get("model_type", hf.get("model_type"))
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a Gemma 2 / Gemma 3 "
                              f"text model (expected one of {sorted(_FAMILY_OF_MODEL_TYPE)})")
    defaults = _HF_DEFAULTS[family]

    def get(key):
        return text.get(key, defaults.get(key))

    activation = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    refusals = {
        "hidden_activation": (activation, activation != "gelu_pytorch_tanh"),
        "attention_bias": (text.get("attention_bias"), bool(text.get("attention_bias"))),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True),
                                not hf.get("tie_word_embeddings", True)),
        "use_bidirectional_attention": (text.get("use_bidirectional_attention"),
                                        bool(text.get("use_bidirectional_attention"))),
    }
    for field, (value, unsupported) in refusals.items():
        if unsupported:
            raise CheckpointError(f"{source}: {field}={value!r} is not supported by this model")

    num_layers = int(get("num_hidden_layers"))
    embed_dim = int(get("hidden_size"))
    (local_base, local_scale), (global_base, global_scale) = _rope_pair(text, family, source)
    soft_caps = [text.get(k, defaults[k]) for k in
                 ("attn_logit_softcapping", "final_logit_softcapping")]
    return from_dimensions(
        family,
        num_layers=num_layers,
        vocab_size=int(get("vocab_size")),
        embed_dim=embed_dim,
        hidden_dim=int(get("intermediate_size")),
        num_heads=int(get("num_attention_heads")),
        num_kv_heads=int(get("num_key_value_heads")),
        head_dim=int(get("head_dim")),
        attention_kinds=_attention_kinds(text, family, num_layers, source),
        sliding_window=int(get("sliding_window")),
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")) ** -0.5,
        attn_logit_softcap=None if soft_caps[0] is None else float(soft_caps[0]),
        final_logit_softcap=None if soft_caps[1] is None else float(soft_caps[1]),
        local_rope_base=local_base,
        global_rope_base=global_base,
        local_rope_scale=local_scale,
        global_rope_scale=global_scale,
        norm_eps=float(get("rms_norm_eps")),
    )


def hf_config(config: ModelConfig, dtype: jnp.dtype = jnp.bfloat16) -> dict:
    """config.json of the *ForCausalLM model equal to `config` (for transformers 4.x and 5)."""
    c = config
    family_type = {"gemma2": ("Gemma2ForCausalLM", "gemma2"),
                   "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
    architecture, model_type = family_type[c.family]
    scalar = c.query_pre_attn_scalar ** -2  # our multiplier is scalar**-0.5
    if math.isclose(scalar, round(scalar), rel_tol=1e-9):
        scalar = round(scalar)

    def rope(base, scale):
        if scale == 1.0:
            return {"rope_type": "default", "rope_theta": base}
        return {"rope_type": "linear", "rope_theta": base, "factor": scale}

    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.embed_dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.norm_eps,
        "query_pre_attn_scalar": scalar,
        "sliding_window": c.sliding_window,
        "layer_types": ["sliding_attention" if k == AttentionKind.LOCAL else "full_attention"
                        for k in c.attention_kinds],
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "max_position_embeddings": _HF_DEFAULTS[c.family]["max_position_embeddings"],
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "dtype": jnp.dtype(dtype).name,
        "torch_dtype": jnp.dtype(dtype).name,  # the transformers 4.x name
        # transformers 4.x keys; 5.x prefers rope_parameters below when both are present.
        "rope_theta": c.global_rope_base,
        "rope_scaling": (None if c.global_rope_scale == 1.0 else
                         {"rope_type": "linear", "factor": c.global_rope_scale}),
    }
    if c.family == "gemma2":
        if (c.local_rope_base, c.local_rope_scale) != (c.global_rope_base, c.global_rope_scale):
            raise ValueError("Gemma 2 in transformers has one rope for all layers; this config "
                             "has different local and global ropes")
        out["rope_parameters"] = rope(c.global_rope_base, c.global_rope_scale)
    else:
        out["rope_local_base_freq"] = c.local_rope_base
        out["rope_parameters"] = {
            "sliding_attention": rope(c.local_rope_base, c.local_rope_scale),
            "full_attention": rope(c.global_rope_base, c.global_rope_scale),
        }
    return out


# --- tensors: HF layout <-> official layout -------------------------------------------------

Reader = Callable[[str], np.ndarray]  # HF name without prefix -> array of the checked shape


def hf_layout_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name (without the `model.` prefix) -> shape, for every tensor `config` needs."""
    c = config
    d, f, h = c.embed_dim, c.hidden_dim, c.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, d), "norm.weight": (d,)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c.num_heads * h, d),
            p + "self_attn.k_proj.weight": (c.num_kv_heads * h, d),
            p + "self_attn.v_proj.weight": (c.num_kv_heads * h, d),
            p + "self_attn.o_proj.weight": (d, c.num_heads * h),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
        if c.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (h,)
            shapes[p + "self_attn.k_norm.weight"] = (h,)
        for hf_norm in _NORMS.values():
            shapes[p + hf_norm + ".weight"] = (d,)
    return shapes


def official_tensor(config: ModelConfig, path: str, read: Reader) -> np.ndarray:
    """The official-layout param at `path` ('layer_0/attn/q_einsum/w'), from HF-layout tensors."""
    c = config
    d, h = c.embed_dim, c.head_dim
    if path == "embedder/input_embedding":
        return read("embed_tokens.weight")
    if path == "final_norm/scale":
        return read("norm.weight")
    layer, rest = path.split("/", 1)
    p = f"layers.{int(layer.removeprefix('layer_'))}."

    def heads(name: str, count: int) -> np.ndarray:  # (count * H, D) -> (count, D, H)
        return read(p + f"self_attn.{name}_proj.weight").reshape(count, h, d).transpose(0, 2, 1)

    norm = rest.removesuffix("/scale")
    if norm in _NORMS:
        return read(p + _NORMS[norm] + ".weight")
    match rest:
        case "attn/q_einsum/w":
            return heads("q", c.num_heads)
        case "attn/kv_einsum/w":
            return np.stack([heads("k", c.num_kv_heads), heads("v", c.num_kv_heads)])
        case "attn/qkv_einsum/w":
            return np.stack([heads(n, c.num_heads) for n in ("q", "k", "v")])
        case "attn/attn_vec_einsum/w":  # (D, N * H) -> (N, H, D)
            return read(p + "self_attn.o_proj.weight").T.reshape(c.num_heads, h, d)
        case "attn/_query_norm/scale":
            return read(p + "self_attn.q_norm.weight")
        case "attn/_key_norm/scale":
            return read(p + "self_attn.k_norm.weight")
        case "mlp/gating_einsum":  # two (F, D) -> (2, F, D) or (2, D, F)
            gate, up = read(p + "mlp.gate_proj.weight"), read(p + "mlp.up_proj.weight")
            return np.stack([gate, up] if c.transpose_gating_einsum else [gate.T, up.T])
        case "mlp/linear":  # (D, F) -> (F, D)
            return read(p + "mlp.down_proj.weight").T
    raise CheckpointError(f"no Hugging Face tensor maps to param '{path}'")


def hf_tensor(config: ModelConfig, params: Mapping[str, object], name: str) -> np.ndarray:
    """The HF-layout tensor `name` (no prefix) from flat official params: inverse of the above."""
    c = config
    if name == "embed_tokens.weight":
        return np.asarray(params["embedder/input_embedding"])
    if name == "norm.weight":
        return np.asarray(params["final_norm/scale"])
    parts = name.split(".")  # layers.{i}.[self_attn.|mlp.]{module}.weight
    layer, module = f"layer_{parts[1]}/", parts[-2]
    hf_to_norm = {v: k for k, v in _NORMS.items()}
    if module in hf_to_norm:
        return np.asarray(params[layer + hf_to_norm[module] + "/scale"])

    def projection(which: int) -> np.ndarray:  # 0, 1, 2 = q, k, v -> (count * H, D)
        if c.use_qkv_einsum:
            w = np.asarray(params[layer + "attn/qkv_einsum/w"])[which]
        elif which == 0:
            w = np.asarray(params[layer + "attn/q_einsum/w"])
        else:
            w = np.asarray(params[layer + "attn/kv_einsum/w"])[which - 1]
        return w.transpose(0, 2, 1).reshape(-1, c.embed_dim)

    def gating(which: int) -> np.ndarray:  # 0, 1 = gate, up -> (F, D)
        w = np.asarray(params[layer + "mlp/gating_einsum"])[which]
        return w if c.transpose_gating_einsum else w.T

    match module:
        case "q_proj" | "k_proj" | "v_proj":
            return projection("qkv".index(module[0]))
        case "o_proj":
            return np.asarray(params[layer + "attn/attn_vec_einsum/w"]).reshape(
                -1, c.embed_dim).T
        case "q_norm":
            return np.asarray(params[layer + "attn/_query_norm/scale"])
        case "k_norm":
            return np.asarray(params[layer + "attn/_key_norm/scale"])
        case "gate_proj" | "up_proj":
            return gating(0 if module == "gate_proj" else 1)
        case "down_proj":
            return np.asarray(params[layer + "mlp/linear"]).T
    raise ValueError(f"unknown Hugging Face tensor name {name!r}")


# --- safetensors ----------------------------------------------------------------------------


# safetensors dtype code -> numpy dtype (the format is little-endian, like every host we run on).
_NUMPY_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                 "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16)}
_READ_CHUNK = 1 << 24  # bytes of the stored dtype held at a time while converting dtypes


class _Safetensors:
    """One safetensors file, read with plain reads (safe_open maps the file, and every page a
    tensor read touches stays resident next to the copy we keep)."""

    def __init__(self, file: Path):
        self.file = file
        with open(file, "rb") as f:  # 8-byte little-endian length, then that much JSON
            self.size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else self.size
            if length > self.size - 8:
                raise CheckpointError(f"{file}: not a safetensors file (no complete header)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{file}: not a safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + length

    def field(self, key: str, name: str):
        """Header field `name` ('dtype', 'shape', 'data_offsets') of tensor `key`."""
        entry = self.entries[key]
        if not isinstance(entry, dict) or name not in entry:
            raise CheckpointError(f"{self.file}: tensor '{key}' has no '{name}' in the header")
        return entry[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.field(key, "shape"))

    def read(self, key: str, dtype: np.dtype) -> np.ndarray:
        """Tensor `key` converted to `dtype`, in an aligned buffer build_params places as is."""
        code, shape = self.field(key, "dtype"), self.shape(key)
        stored = _NUMPY_DTYPES.get(code)
        if stored is None:
            raise CheckpointError(f"{self.file}: tensor '{key}' has dtype {code!r} "
                                  f"(expected one of {', '.join(_NUMPY_DTYPES)})")
        offsets = self.field(key, "data_offsets")
        begin, end = (self.data_start + int(n) for n in offsets)
        if end - begin != math.prod(shape) * stored.itemsize or end > self.size:
            raise CheckpointError(f"{self.file}: tensor '{key}' has data_offsets {offsets}, "
                                  f"which do not hold {code} {shape} inside the file")
        out = aligned_empty(shape, dtype)
        flat = out.reshape(-1)
        with open(self.file, "rb", buffering=0) as f:
            if stored == dtype:
                read_into(f, begin, flat)
                return out
            step = max(1, _READ_CHUNK // stored.itemsize)
            chunk = np.empty(min(step, flat.size), stored)
            for start in range(0, flat.size, step):
                part = chunk[:min(step, flat.size - start)]
                read_into(f, begin + start * stored.itemsize, part)
                flat[start:start + part.size] = part  # the cast astype() would make
        return out


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors or the sharded index."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return dict.fromkeys(_Safetensors(single).entries, single)


def load_hf(path: str | Path, config: ModelConfig | None = None,
            dtype: jnp.dtype = jnp.float32, shardings: Mapping | None = None, *,
            mesh=None, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """(config, params) from a Hugging Face Gemma directory (config.json + safetensors);
    placed and laid out as `common.build_params` says (`mesh`, `scan_layers`).

    `config` overrides the one read from config.json; tensor shapes are checked against it.
    Tensors are read, converted and placed one at a time.
    """
    directory = require_file(path, "Hugging Face checkpoint directory")
    config_path = require_file(directory / "config.json", "config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if config is None:
        config = config_from_hf(hf, str(config_path))

    files = _weight_files(directory)
    prefix = next((p for p in TEXT_PREFIXES if p + "embed_tokens.weight" in files), None)
    if prefix is None:
        raise CheckpointError(f"{directory}: no embedding tensor "
                              f"({' / '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES)}); "
                              "not a Gemma text checkpoint")
    expected = hf_layout_shapes(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    used: set[str] = set()
    shards: dict[Path, _Safetensors] = {}

    def read(name: str) -> np.ndarray:
        key = prefix + name
        file = files.get(key)
        if file is None:
            raise CheckpointError(f"{directory}: missing tensor '{key}' "
                                  f"(expected shape {expected[name]})")
        if file not in shards:
            shards[file] = _Safetensors(require_file(file, "safetensors shard"))
        shard = shards[file]
        if key not in shard.entries:
            raise CheckpointError(f"{file}: missing tensor '{key}' (listed in the index)")
        if shard.shape(key) != expected[name]:
            raise CheckpointError(f"{file}: tensor '{key}' has shape {shard.shape(key)}, "
                                  f"the config expects {expected[name]}")
        used.add(key)
        # Cast here, elementwise as build_params would, so that only the target dtype is held.
        return shard.read(key, np_dtype)

    params = build_params(config, str(directory), lambda p: official_tensor(config, p, read),
                          dtype, shardings, mesh=mesh, scan_layers=scan_layers)
    unused = sorted(k for k in files if k.startswith(prefix) and k not in used)
    if unused:
        raise CheckpointError(f"{directory}: {len(unused)} tensors the config "
                              f"({config.num_layers} layers) does not use, e.g. {unused[:3]}")
    return config, params


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(file: Path, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype,
                       tensor: Callable[[str], np.ndarray]) -> None:
    """Streams tensors into a safetensors file one at a time (no second copy of the model)."""
    code = _SAFETENSORS_DTYPES[dtype.name]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, shape in shapes.items():
            array = np.ascontiguousarray(tensor(name), dtype=dtype)
            if array.shape != shape:
                raise ValueError(f"tensor '{name}' has shape {array.shape}, expected {shape}")
            out.write(memoryview(array.reshape(-1).view(np.uint8)))


def save_hf(params: Mapping, config: ModelConfig, out_dir: str | Path,
            dtype: jnp.dtype = jnp.bfloat16) -> Path:
    """Writes config.json + model.safetensors that transformers loads as *ForCausalLM."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(jnp.dtype(dtype))
    if dtype.name not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"cannot export dtype {dtype.name}; use one of {list(_SAFETENSORS_DTYPES)}")
    flat = flatten(params)
    shapes = {"model." + name: shape for name, shape in sorted(hf_layout_shapes(config).items())}

    def tensor(name: str) -> np.ndarray:
        return hf_tensor(config, flat, name.removeprefix("model."))

    write_atomically(out_dir / "model.safetensors",
                     lambda tmp: _write_safetensors(tmp, shapes, dtype, tensor))
    write_text_atomically(out_dir / "config.json",
                          json.dumps(hf_config(config, dtype), indent=2) + "\n")
    return out_dir
