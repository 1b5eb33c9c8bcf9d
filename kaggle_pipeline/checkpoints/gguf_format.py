"""llama.cpp GGUF files of Gemma 2 / Gemma 3: metadata -> config, dequantized tensors -> params.

Dequantized GGUF matrices come out as numpy (out_features, in_features), the orientation of the
Hugging Face weights they were converted from (llama.cpp does not permute Gemma's q/k), so the
HF layout conversion applies unchanged. llama.cpp's converter adds 1 to every norm weight to fold
Gemma's (1 + w); we subtract it again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import gguf
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline.checkpoints.common import (
    CheckpointError,
    aligned_empty,
    build_params,
    read_into,
    require_file,
)
from kaggle_pipeline.checkpoints.gguf_header import Header, HeaderError, TensorInfo, read_header
from kaggle_pipeline.checkpoints.hf_format import (
    hf_layout_shapes,
    official_tensor,
)
from kaggle_pipeline.model.config import (
    GEMMA2_PATTERN,
    GEMMA3_PATTERN,
    AttentionKind,
    ModelConfig,
    from_dimensions,
    query_scale_for,
    repeat_pattern,
)

SUPPORTED_ARCHITECTURES = ("gemma2", "gemma3")

# HF module name (inside layers.{i}.) -> llama.cpp tensor name (inside blk.{i}.).
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_ELEMENTS_PER_CHUNK = 1 << 22  # dequantize in slices: a bf16 embedding never exists in f32


def gguf_name(hf_name: str) -> str:
    """'layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    if hf_name == "embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "norm.weight":
        return "output_norm.weight"
    _, index, rest = hf_name.split(".", 2)
    return f"blk.{index}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def config_from_gguf(header: Header, source: str) -> ModelConfig:
    """ModelConfig from GGUF metadata, filling what llama.cpp hard-codes for Gemma."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported "
                              f"(expected one of {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata has no '{arch}.{key}'")
        return value

    embed_dim, num_layers = int(need("embedding_length")), int(need("block_count"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", embed_dim // num_heads))
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{source}: GGUF has no tensor 'token_embd.weight'")

    # llama.cpp: the 27B models scale queries by 1/sqrt(embed_dim / heads), others by head_dim.
    is_27b = num_layers == (46 if arch == "gemma2" else 62)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, np.ndarray):  # per layer: true = sliding window
        if len(pattern) != num_layers:
            raise CheckpointError(f"{source}: '{arch}.attention.sliding_window_pattern' has "
                                  f"{len(pattern)} entries for {num_layers} blocks")
        kinds = tuple(AttentionKind.LOCAL if p else AttentionKind.GLOBAL for p in pattern)
    elif pattern is not None:  # every pattern-th layer is global
        kinds = tuple(AttentionKind.GLOBAL if (i + 1) % int(pattern) == 0 else AttentionKind.LOCAL
                      for i in range(num_layers))
    else:
        kinds = repeat_pattern(GEMMA2_PATTERN if arch == "gemma2" else GEMMA3_PATTERN, num_layers)

    global_base = float(meta.get(f"{arch}.rope.freq_base",
                                 10_000.0 if arch == "gemma2" else 1_000_000.0))
    # llama.cpp runs Gemma 3's sliding layers at base 10k unless the file says otherwise;
    # Gemma 2 uses one base everywhere.
    local_base = float(meta.get(f"{arch}.rope.freq_base_swa",
                                global_base if arch == "gemma2" else 10_000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{source}: rope scaling {scaling!r} is not supported")
    global_scale = float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) \
        if scaling == "linear" else 1.0
    caps = [meta.get(f"{arch}.{k}_logit_softcapping") for k in ("attn", "final")]
    return from_dimensions(
        arch,
        num_layers=num_layers,
        vocab_size=int(embedding.shape[0]),
        embed_dim=embed_dim,
        hidden_dim=int(need("feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        attention_kinds=kinds,
        sliding_window=int(need("attention.sliding_window")),
        query_pre_attn_scalar=query_scale_for(embed_dim, num_heads, head_dim, by_embed=is_27b),
        attn_logit_softcap=None if caps[0] is None else float(caps[0]),
        final_logit_softcap=None if caps[1] is None else float(caps[1]),
        local_rope_base=local_base,
        global_rope_base=global_base,
        global_rope_scale=global_scale,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
    )


def read_tensor(tensor: TensorInfo, file: BinaryIO, dtype: np.dtype) -> np.ndarray:
    """The tensor dequantized to `dtype`, a slice of rows at a time (blocks never span rows) into
    an aligned buffer that build_params places as is. Plain reads, not a memory mapping, whose
    touched pages would stay resident next to our copy."""
    cols = tensor.shape[-1]
    count = math.prod(tensor.shape) // cols
    row_bytes = tensor.nbytes // count
    out = aligned_empty((count, cols), dtype)
    step = max(1, _ELEMENTS_PER_CHUNK // cols)
    raw = np.empty((min(step, count), row_bytes), np.uint8)
    for start in range(0, count, step):
        part = raw[:min(step, count - start)]
        read_into(file, tensor.offset + start * row_bytes, part)
        out[start:start + len(part)] = gguf.quants.dequantize(part, tensor.qtype)
    return out.reshape(tensor.shape)


def read_gguf_header(path: str | Path) -> Header:
    """The metadata and tensor index; CheckpointError when the file is not a readable GGUF."""
    try:
        return read_header(path)
    except HeaderError as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err.reason})") from None


def load_gguf(path: str | Path, dtype: jnp.dtype = jnp.float32,
              shardings: Mapping | None = None, *, config: ModelConfig | None = None,
              mesh=None, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """(config, params) from a Gemma 2 / Gemma 3 GGUF file, dequantized to `dtype`; placed and
    laid out as `common.build_params` says (`mesh`, `scan_layers`).

    `config` overrides the one read from the metadata; tensor shapes are checked against it.
    """
    path = require_file(path, "GGUF file")
    header = read_gguf_header(path)
    source = str(path)
    if config is None:
        config = config_from_gguf(header, source)
    tensors = header.tensors
    expected = hf_layout_shapes(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    used: set[str] = set()

    def read(hf_name: str) -> np.ndarray:
        name = gguf_name(hf_name)
        tensor = tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{source}: missing tensor '{name}' "
                                  f"(expected shape {expected[hf_name]})")
        if tensor.shape != expected[hf_name]:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tensor.shape}, "
                                  f"the config expects {expected[hf_name]}")
        used.add(name)
        if hf_name.endswith("norm.weight"):  # small f32 vectors: undo the +1 before casting
            return (read_tensor(tensor, file, np.dtype(np.float32)) - 1.0).astype(np_dtype)
        return read_tensor(tensor, file, np_dtype)

    with open(path, "rb", buffering=0) as file:
        params = build_params(config, source, lambda p: official_tensor(config, p, read),
                              dtype, shardings, mesh=mesh, scan_layers=scan_layers)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensors the config "
                              f"({config.num_layers} layers) does not use, e.g. {unused[:3]}")
    return config, params
