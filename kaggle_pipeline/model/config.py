"""Model configurations: one frozen dataclass for Gemma 2 and Gemma 3 text models.

Hyper-parameters follow DeepMind's reference (`gemma/gm/nn/_gemma.py`). A family builder
(`gemma2`, `gemma3`) holds what every model of a family shares; a preset row gives the rest by
keyword, so a size that differs (the 27B's query scale) says so in its own row.
"""

from __future__ import annotations

import dataclasses
import enum


class AttentionKind(enum.Enum):
    GLOBAL = "global"
    LOCAL = "local"  # sliding window


GEMMA2_PATTERN = (AttentionKind.LOCAL, AttentionKind.GLOBAL)
GEMMA3_PATTERN = (AttentionKind.LOCAL,) * 5 + (AttentionKind.GLOBAL,)
FAMILIES = ("gemma2", "gemma3")


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


def gemma2(*, num_layers: int, head_dim: int, query_pre_attn_scalar: float | None = None,
           **fields) -> ModelConfig:
    """A Gemma 2 model: local/global alternation, 4k window, soft-capped logits."""
    values = dict(vocab_size=256_128, sliding_window=4096, attn_logit_softcap=50.0,
                  final_logit_softcap=30.0) | fields
    return ModelConfig(
        family="gemma2", head_dim=head_dim,
        attention_kinds=repeat_pattern(GEMMA2_PATTERN, num_layers),
        query_pre_attn_scalar=query_pre_attn_scalar or head_dim**-0.5, **values)


def gemma3(*, num_layers: int, head_dim: int, query_pre_attn_scalar: float | None = None,
           **fields) -> ModelConfig:
    """A Gemma 3 model: five local layers per global one, QK-norm, 1M rope base for global."""
    values = dict(vocab_size=262_144, use_qk_norm=True, transpose_gating_einsum=True,
                  local_rope_base=10_000.0, global_rope_base=1_000_000.0) | fields
    return ModelConfig(
        family="gemma3", head_dim=head_dim,
        attention_kinds=repeat_pattern(GEMMA3_PATTERN, num_layers),
        query_pre_attn_scalar=query_pre_attn_scalar or head_dim**-0.5, **values)


_OFFICIAL: dict[str, ModelConfig] = {
    "gemma2-2b": gemma2(embed_dim=2304, hidden_dim=9216, num_heads=8, num_kv_heads=4,
                        head_dim=256, num_layers=26),
    "gemma2-9b": gemma2(embed_dim=3584, hidden_dim=14336, num_heads=16, num_kv_heads=8,
                        head_dim=256, num_layers=42, transpose_gating_einsum=True),
    # 27B scales queries by 1/sqrt(embed_dim / num_heads) = 1/sqrt(144), not 1/sqrt(head_dim).
    "gemma2-27b": gemma2(embed_dim=4608, hidden_dim=36864, num_heads=32, num_kv_heads=16,
                         head_dim=128, num_layers=46, transpose_gating_einsum=True,
                         query_pre_attn_scalar=(4608 / 32) ** -0.5),
    "gemma3-270m": gemma3(embed_dim=640, hidden_dim=2048, num_heads=4, num_kv_heads=1,
                          head_dim=256, num_layers=18, sliding_window=512),
    "gemma3-1b": gemma3(embed_dim=1152, hidden_dim=6 * 1152, num_heads=4, num_kv_heads=1,
                        head_dim=256, num_layers=26, sliding_window=512),
    "gemma3-4b": gemma3(embed_dim=2560, hidden_dim=4 * 2560, num_heads=8, num_kv_heads=4,
                        head_dim=256, num_layers=34, sliding_window=1024, global_rope_scale=8.0),
    "gemma3-12b": gemma3(embed_dim=3840, hidden_dim=4 * 3840, num_heads=16, num_kv_heads=8,
                         head_dim=256, num_layers=48, sliding_window=1024,
                         global_rope_scale=8.0),
    # Like Gemma 2 27B: queries scaled by 1/sqrt(embed_dim / num_heads) = 1/sqrt(168).
    "gemma3-27b": gemma3(embed_dim=5376, hidden_dim=4 * 5376, num_heads=32, num_kv_heads=16,
                         head_dim=128, num_layers=62, sliding_window=1024,
                         global_rope_scale=8.0, query_pre_attn_scalar=(5376 / 32) ** -0.5),
}
# The instruction-tuned ("-it") checkpoints share their base model's config object.
PRESETS: dict[str, ModelConfig] = _OFFICIAL | {f"{name}-it": c for name, c in _OFFICIAL.items()}


def tiny_config(family: str, *, num_layers: int = 4, sliding_window: int = 8,
                vocab_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                **overrides) -> ModelConfig:
    """A few-kilobyte model with the real family's maths, for tests."""
    builders = {"gemma2": gemma2, "gemma3": gemma3}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}: expected 'gemma2' or 'gemma3'")
    head_dim = overrides.pop("head_dim", 16)
    cfg = builders[family](num_layers=num_layers, head_dim=head_dim, vocab_size=vocab_size,
                           embed_dim=32, hidden_dim=64, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, sliding_window=sliding_window)
    return cfg.replace(**overrides)


def get_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def official_gating_transposed(family: str, embed_dim: int, num_layers: int) -> bool:
    """Whether DeepMind's checkpoint of this size stores gating as (2, F, D): keeps params loaded
    from other formats interchangeable with the official Flax ones."""
    for preset in _OFFICIAL.values():
        if (preset.family, preset.embed_dim, preset.num_layers) == (family, embed_dim, num_layers):
            return preset.transpose_gating_einsum
    return family == "gemma3"


def from_dimensions(family: str, *, embed_dim: int, num_layers: int, **fields) -> ModelConfig:
    """A config read from a checkpoint's own description (HF config.json, GGUF metadata): the
    dimensions it states, and what the family fixes (QK-norm, the official gating layout)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    return ModelConfig(family=family, embed_dim=embed_dim, use_qk_norm=family == "gemma3",
                       transpose_gating_einsum=official_gating_transposed(
                           family, embed_dim, num_layers), **fields)


def query_scale_for(embed_dim: int, num_heads: int, head_dim: int, by_embed: bool) -> float:
    """1/sqrt(head_dim), or 1/sqrt(embed_dim / num_heads) for the models that use it (27B)."""
    return (embed_dim / num_heads if by_embed else head_dim) ** -0.5
