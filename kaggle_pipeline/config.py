"""Model configurations: one frozen dataclass for Gemma 2 and Gemma 3 text models.

Hyper-parameters follow DeepMind's reference (`gemma/gm/nn/_gemma.py`).
"""

from __future__ import annotations

import dataclasses
import enum


class AttentionKind(enum.Enum):
    GLOBAL = "global"
    LOCAL = "local"  # sliding window


GEMMA2_PATTERN = (AttentionKind.LOCAL, AttentionKind.GLOBAL)
GEMMA3_PATTERN = (AttentionKind.LOCAL,) * 5 + (AttentionKind.GLOBAL,)


def repeat_pattern(pattern: tuple[AttentionKind, ...],
                   num_layers: int) -> tuple[AttentionKind, ...]:
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shapes and the maths of a Gemma text model."""

    family: str  # "gemma2" | "gemma3"
    vocab_size: int
    embed_dim: int
    hidden_dim: int  # MLP width
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_kinds: tuple[AttentionKind, ...]
    sliding_window: int
    query_pre_attn_scalar: float  # multiplies queries before the dot product
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_qk_norm: bool = False
    transpose_gating_einsum: bool = False  # gating weight stored (2, hidden, embed)
    local_rope_base: float = 10_000.0
    global_rope_base: float = 10_000.0
    local_rope_scale: float = 1.0
    global_rope_scale: float = 1.0
    norm_eps: float = 1e-6

    @property
    def num_layers(self) -> int:
        return len(self.attention_kinds)

    @property
    def use_qkv_einsum(self) -> bool:
        # The official layout fuses q, k, v into one weight when there is no GQA.
        return self.num_kv_heads == self.num_heads

    def rope(self, kind: AttentionKind) -> tuple[float, float]:
        """(base frequency, scale factor) of the layers of this kind."""
        if kind == AttentionKind.LOCAL:
            return self.local_rope_base, self.local_rope_scale
        return self.global_rope_base, self.global_rope_scale

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, n, k, h = (self.embed_dim, self.hidden_dim, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = n * d * h * 2 + 2 * k * d * h + (2 * h if self.use_qk_norm else 0)
        layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.num_layers * layer + d


def _gemma2(embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim, num_layers,
            query_pre_attn_scalar, transpose_gating_einsum) -> ModelConfig:
    return ModelConfig(
        family="gemma2",
        vocab_size=256_128,
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        attention_kinds=repeat_pattern(GEMMA2_PATTERN, num_layers),
        sliding_window=4096,
        query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        transpose_gating_einsum=transpose_gating_einsum,
    )


def _gemma3(embed_dim, hidden_dim, num_heads, num_kv_heads, head_dim, num_layers,
            sliding_window, global_rope_scale) -> ModelConfig:
    return ModelConfig(
        family="gemma3",
        vocab_size=262_144,
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        attention_kinds=repeat_pattern(GEMMA3_PATTERN, num_layers),
        sliding_window=sliding_window,
        query_pre_attn_scalar=head_dim**-0.5,
        use_qk_norm=True,
        transpose_gating_einsum=True,
        local_rope_base=10_000.0,
        global_rope_base=1_000_000.0,
        global_rope_scale=global_rope_scale,
    )


PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": _gemma2(2304, 9216, 8, 4, 256, 26, 256**-0.5, False),
    "gemma2-9b": _gemma2(3584, 14336, 16, 8, 256, 42, 256**-0.5, True),
    # 27B scales queries by 1/sqrt(embed_dim / num_heads) = 1/sqrt(144), not 1/sqrt(head_dim).
    "gemma2-27b": _gemma2(4608, 36864, 32, 16, 128, 46, (4608 / 32) ** -0.5, True),
    "gemma3-270m": _gemma3(640, 2048, 4, 1, 256, 18, 512, 1.0),
    "gemma3-1b": _gemma3(1152, 6 * 1152, 4, 1, 256, 26, 512, 1.0),
    "gemma3-4b": _gemma3(2560, 2560 * 4, 8, 4, 256, 34, 1024, 8.0),
    "gemma3-12b": _gemma3(3840, 3840 * 4, 16, 8, 256, 48, 1024, 8.0),
    "gemma3-27b": _gemma3(5376, 5376 * 4, 32, 16, 128, 62, 1024, 8.0),
}
for _name in ("gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma3-270m", "gemma3-1b", "gemma3-4b",
              "gemma3-12b", "gemma3-27b"):
    PRESETS[_name + "-it"] = PRESETS[_name]
PRESETS["gemma3-27b"] = PRESETS["gemma3-27b"].replace(query_pre_attn_scalar=(5376 / 32) ** -0.5)
PRESETS["gemma3-27b-it"] = PRESETS["gemma3-27b"]


def tiny_config(family: str, *, num_layers: int = 4, sliding_window: int = 8,
                vocab_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                **overrides) -> ModelConfig:
    """A few-kilobyte model with the real family's maths, for tests."""
    head_dim = overrides.pop("head_dim", 16)
    common = dict(vocab_size=vocab_size, embed_dim=32, hidden_dim=64, num_heads=num_heads,
                  num_kv_heads=num_kv_heads, head_dim=head_dim, sliding_window=sliding_window)
    if family == "gemma2":
        cfg = ModelConfig(family="gemma2",
                          attention_kinds=repeat_pattern(GEMMA2_PATTERN, num_layers),
                          query_pre_attn_scalar=head_dim**-0.5, attn_logit_softcap=50.0,
                          final_logit_softcap=30.0, **common)
    elif family == "gemma3":
        cfg = ModelConfig(family="gemma3",
                          attention_kinds=repeat_pattern(GEMMA3_PATTERN, num_layers),
                          query_pre_attn_scalar=head_dim**-0.5, use_qk_norm=True,
                          transpose_gating_einsum=True, global_rope_base=1_000_000.0, **common)
    else:
        raise ValueError(f"unknown family {family!r}: expected 'gemma2' or 'gemma3'")
    return cfg.replace(**overrides)


def get_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def query_scale_for(embed_dim: int, num_heads: int, head_dim: int, by_embed: bool) -> float:
    """1/sqrt(head_dim), or 1/sqrt(embed_dim / num_heads) for the models that use it (27B)."""
    return (embed_dim / num_heads if by_embed else head_dim) ** -0.5
