"""Official Gemma Flax/Orbax checkpoints (Kaggle Models, DeepMind) in and out.

Three on-disk layouts exist (DeepMind `gemma/gm/ckpts/_checkpoint.py`):
  NESTED   {'layer_0': {'attn': {'q_einsum': {'w': ...}}, 'mlp': {'linear': ...}}, ...}
           what `gm.ckpts.save_params` writes: exactly our param tree.
  FLAT     {'transformer/layer_0/attn/q_einsum': {'w': ...},
            'transformer/layer_0/mlp/linear': {'w': ...}, 'transformer/embedder': {...}}
           the published Kaggle Flax checkpoints.
  STACKED  {'transformer/stacked_layers/attention_type_1/attn/q_einsum': {'w': [S, ...]}, ...}
           layer i is slice i // P of attention_type_{i % P}, P the attention pattern length.
Kauldron training checkpoints hold a NESTED tree under 'params'. Vision-encoder weights
(Gemma 3 4B+) are ignored: this loads the text model.

Weights are restored one tensor at a time, straight into the requested dtype as numpy arrays,
so loading never holds a second copy of the model (STACKED is the exception: each stacked
tensor is read whole and kept until all its layers are placed).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kaggle_pipeline.checkpoints.common import (
    CheckpointError,
    build_params,
    expected_shapes,
    flatten,
    require_file,
)
from kaggle_pipeline.files import atomic_directory
from kaggle_pipeline.model.config import PRESETS, ModelConfig

FLAT_PREFIX = "transformer/"
# In the FLAT layout the MLP weights sit one level deeper, under 'w'.
_MLP_BARE = ("mlp/gating_einsum", "mlp/linear")
# Files that mark a directory as an Orbax PyTree checkpoint (new and legacy formats).
_CHECKPOINT_FILES = ("_METADATA", "checkpoint", "manifest.ocdbt")
_STACKED_KEY = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one of our params lives in the checkpoint."""

    keys: tuple[str, ...]  # path in the checkpoint tree
    shape: tuple[int, ...]  # shape of our param
    index: int | None = None  # slice of a STACKED tensor


def find_checkpoint_dir(path: str | Path) -> Path:
    """The Orbax checkpoint directory at `path`, in its `default/` item dir or its only subdir.

    Kaggle's Flax models unpack as <dir>/gemma2-2b-it/{_METADATA, ...} + <dir>/tokenizer.model,
    Orbax CheckpointManager and Kauldron steps as <dir>/default/.
    """
    path = require_file(path, "Orbax checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: an Orbax checkpoint is a directory, this is a file")
    if _is_checkpoint_dir(path):
        return path
    if _is_checkpoint_dir(path / "default"):
        return path / "default"
    found = sorted(p for p in path.iterdir() if p.is_dir() and _is_checkpoint_dir(p))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{path}: several checkpoints inside ({names}); pass one of them")
    raise CheckpointError(
        f"{path}: no Orbax checkpoint here, in default/ or in a subdirectory "
        f"(looked for {', '.join(_CHECKPOINT_FILES)})")


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in _CHECKPOINT_FILES)


def read_metadata(ckpt_dir: Path) -> dict:
    """The checkpoint's tree of array metadata (shape, dtype), without reading any weight."""
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(ckpt_dir)
    except Exception as e:  # orbax raises many types for unreadable dirs
        raise CheckpointError(f"{ckpt_dir}: cannot read Orbax metadata: {e}") from e
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if not isinstance(tree, Mapping) or not tree:
        raise CheckpointError(f"{ckpt_dir}: Orbax metadata holds no parameter tree")
    return dict(tree)


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for key, value in tree.items():
        keys = (*prefix, str(key))
        if isinstance(value, Mapping):
            out.update(_leaves(value, keys))
        else:
            out[keys] = value
    return out


def _our_name(flat_key: str, leaf: str) -> str:
    """'transformer/layer_0/mlp/linear', 'w' -> 'layer_0/mlp/linear' (FLAT -> our path)."""
    name = flat_key.removeprefix(FLAT_PREFIX)
    return name if name.endswith(_MLP_BARE) and leaf == "w" else f"{name}/{leaf}"


def _is_text_param(name: str) -> bool:
    # The embedder also holds the vision projections (embedder/mm_*) of multimodal Gemma 3.
    return name in ("embedder/input_embedding", "final_norm/scale") or name.startswith("layer_")


def _text_root(tree: Mapping) -> tuple[tuple[str, ...], Mapping]:
    """Unwraps NESTED params saved inside a Kauldron state ('params') or under 'transformer'."""
    prefix: tuple[str, ...] = ()
    while "embedder" not in tree and not any(str(k).startswith(FLAT_PREFIX) for k in tree):
        wrappers = [k for k in ("params", "transformer") if isinstance(tree.get(k), Mapping)]
        if not wrappers:
            break
        prefix, tree = (*prefix, wrappers[0]), tree[wrappers[0]]
    return prefix, tree


def catalog(tree: Mapping, source: str) -> dict[str, _Entry]:
    """Our param path -> where it lives in the checkpoint, for any of the layouts."""
    prefix, tree = _text_root(tree)
    leaves = _leaves(tree)
    layout = "flat" if any(k[0].startswith(FLAT_PREFIX) for k in leaves) else "nested"
    stacked_pattern = 1 + max(
        (int(m.group(1)) for k in leaves if (m := _STACKED_KEY.match(k[0]))), default=-1)

    entries: dict[str, _Entry] = {}
    for keys, meta in leaves.items():
        if layout == "nested":
            name = "/".join(keys)
            if _is_text_param(name):
                entries[name] = _Entry((*prefix, *keys), tuple(meta.shape))
        elif len(keys) != 2 or not keys[0].startswith(FLAT_PREFIX):
            continue  # vision encoder ('SigLiPFromPatches_0/...') and the like
        elif m := _STACKED_KEY.match(keys[0]):
            pattern_index, rest = int(m.group(1)), m.group(2)
            for i in range(meta.shape[0]):
                name = _our_name(f"layer_{i * stacked_pattern + pattern_index}/{rest}", keys[1])
                entries[name] = _Entry(keys, tuple(meta.shape[1:]), index=i)
        elif _is_text_param(name := _our_name(keys[0], keys[1])):
            entries[name] = _Entry(keys, tuple(meta.shape))
    if "embedder/input_embedding" not in entries:
        raise CheckpointError(
            f"{source}: no 'embedder/input_embedding' weight: not a Gemma checkpoint "
            f"(top-level keys: {', '.join(sorted(map(str, tree))[:8])})")
    return entries


def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> ModelConfig:
    """The preset whose param shapes are exactly `shapes` (our param paths -> shapes)."""
    vocab, embed = shapes["embedder/input_embedding"]
    num_layers = len({k.split("/")[0] for k in shapes if k.startswith("layer_")})
    shapes = {k: tuple(v) for k, v in shapes.items()}
    matches = []
    for name, config in PRESETS.items():
        if any(config is c for _, c in matches):  # "-it" names alias the same config
            continue
        if (config.vocab_size, config.embed_dim, config.num_layers) != (vocab, embed, num_layers):
            continue
        if expected_shapes(config) == shapes:
            matches.append((name, config))
    if len(matches) == 1:
        return matches[0][1]
    layer0 = {k.removeprefix("layer_0/"): v for k, v in shapes.items() if k.startswith("layer_0/")}
    found = (f"vocab_size={vocab}, embed_dim={embed}, num_layers={num_layers}, "
             f"layer_0 shapes {dict(sorted(layer0.items()))}")
    if not matches:
        raise CheckpointError(
            f"{source}: the weight shapes match no known Gemma preset ({found}); "
            f"pass config=ModelConfig(...) (known presets: {', '.join(sorted(PRESETS))})")
    raise CheckpointError(
        f"{source}: the weight shapes match several presets "
        f"({', '.join(n for n, _ in matches)}); pass config= to choose ({found})")


def _restore_one(checkpointer: ocp.Checkpointer, ckpt_dir: Path, entry: _Entry,
                 dtype: jnp.dtype) -> np.ndarray:
    """Reads a single tensor, cast to `dtype` by tensorstore on the way in."""
    item: dict = {}
    restore_args: dict = {}
    node, args_node = item, restore_args
    for key in entry.keys[:-1]:
        node, args_node = node.setdefault(key, {}), args_node.setdefault(key, {})
    node[entry.keys[-1]] = 0  # placeholder: only the structure of `item` matters
    args_node[entry.keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=jnp.dtype(dtype))
    restored = checkpointer.restore(
        ckpt_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))
    for key in entry.keys:
        restored = restored[key]
    return np.asarray(restored)


def load_orbax(path: str | Path, config: ModelConfig | None = None,
               dtype: jnp.dtype = jnp.float32, shardings: Mapping | None = None, *,
               mesh=None, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """Loads an official Gemma Orbax checkpoint -> (config, params in our nested layout).

    `path` is the checkpoint dir, its parent (Kaggle's download dir) or a dir with `default/`.
    Without `config` the preset is recognised from the weight shapes. Weights come out in
    `dtype`, placed and laid out as `common.build_params` says (`shardings`, `mesh`,
    `scan_layers`).
    """
    ckpt_dir = find_checkpoint_dir(path)
    source = str(ckpt_dir)
    entries = catalog(read_metadata(ckpt_dir), source)
    if config is None:
        config = infer_config({k: e.shape for k, e in entries.items()}, source)

    expected = expected_shapes(config)
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: weight '{unexpected[0]}' is not part of the config "
            f"({len(unexpected)} such, the config has {config.num_layers} layers, "
            f"{'fused qkv' if config.use_qkv_einsum else 'q + kv'} projections, "
            f"qk-norm {config.use_qk_norm})")

    stacked: dict[tuple[str, ...], list] = {}  # keys -> [whole tensor, slices still to hand out]

    def fetch(name: str) -> np.ndarray | None:
        entry = entries.get(name)
        if entry is None:
            return None
        if entry.index is None:
            return _restore_one(checkpointer, ckpt_dir, entry, dtype)
        if entry.keys not in stacked:
            whole = _restore_one(checkpointer, ckpt_dir, entry, dtype)
            stacked[entry.keys] = [whole, whole.shape[0]]
        held = stacked[entry.keys]
        piece = np.array(held[0][entry.index])
        held[1] -= 1
        if held[1] == 0:
            del stacked[entry.keys]
        return piece

    with ocp.PyTreeCheckpointer() as checkpointer:
        params = build_params(config, source, fetch, dtype=dtype, shardings=shardings,
                              mesh=mesh, scan_layers=scan_layers)
    return config, params


def to_flat_layout(params: Mapping) -> dict:
    """Our nested params -> the FLAT layout ('transformer/layer_0/attn/q_einsum': {'w'})."""
    out: dict[str, dict] = {}
    for name, value in flatten(params).items():
        if name.endswith(_MLP_BARE):
            parent, leaf = name, "w"
        else:
            parent, leaf = name.rsplit("/", 1)
        out.setdefault(FLAT_PREFIX + parent, {})[leaf] = value
    return out


def save_orbax(params: Mapping, path: str | Path, layout: str = "flat",
               dtype: jnp.dtype | None = None) -> Path:
    """Writes params as an official Orbax checkpoint dir, atomically; returns `path`.

    layout "flat" is what the Kaggle Flax models ship (and what `gm.ckpts.load_params` reads),
    "nested" what `gm.ckpts.save_params` writes. `dtype` casts on the way out (e.g. bfloat16,
    as published). The checkpoint is written beside `path` and renamed into place, so `path`
    never holds a partial one; an existing checkpoint there is moved aside only then.
    """
    path = Path(path).absolute()
    if layout == "flat":
        tree = to_flat_layout(params)
    elif layout == "nested":
        tree = dict(params)
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'flat' or 'nested'")
    to_numpy = (lambda x: np.asarray(x)) if dtype is None else (
        lambda x: np.asarray(x).astype(jnp.dtype(dtype)))
    tree = jax.tree.map(to_numpy, tree)

    def fill(staging: Path) -> None:
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(staging, tree, force=True)  # force: into the empty staging dir

    return atomic_directory(path, fill)
