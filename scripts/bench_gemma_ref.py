"""LoRA train-step timing with DeepMind's `gemma` (runs in .venv-ref; scripts/bench.py calls it).

    .venv-ref/bin/python scripts/bench_gemma_ref.py SPEC.json

SPEC (JSON) holds:
  params   .npz of the f32 base params, keys '/'-joined paths of the official nested layout
  batch    .npz with tokens [B, T] int32 and targets [B, T] bool (token i is predicted from i - 1)
  rank, learning_rate, clip_norm, warmup, steps, result (the JSON file this script writes)
  lora     "attention": LoRA on q, kv and attn_vec einsums only (the targets q, k, v, o);
           "all": plain `gm.nn.LoRA`, which wraps every einsum, the MLP's too

The loss is what a gemma user writes: logits over the whole sequence, then masked cross-entropy.
Imports nothing from kaggle_pipeline: it is the reference.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from gemma import gm, peft
from gemma.gm.nn import _layers
from gemma.gm.nn import _lora as gm_lora

# bench.py sits beside this file and imports only the standard library and numpy at its top.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import reset_peak_rss, rss_mb  # noqa: E402

ATTENTION_EINSUMS = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum")


class AttentionLoRA(gm.nn.LoRA):
    """`gm.nn.LoRA` restricted to the attention projections, with gemma's own wrappers."""

    @nn.compact
    def __call__(self, *args, **kwargs):
        def replace(module: nn.Module) -> nn.Module:
            if isinstance(module, _layers.Einsum) and module.name in ATTENTION_EINSUMS:
                return gm_lora._replace_by_lora(module, rank=self.rank, dtype=self.dtype,
                                                verbose=False)
            return module

        with peft.ModuleInterceptor(replace):
            return self.model(*args, **kwargs)


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def drop_empty(tree: dict) -> dict:
    """split_params leaves an empty dict where a LoRA wrapper held only its adapter."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = drop_empty(value)
            if not value:
                continue
        out[key] = value
    return out


def check_same_tree(ours: dict, theirs: dict, where: str = "") -> None:
    """The base params from our npz must be exactly the tree gemma's model declares."""
    if set(ours) != set(theirs):
        raise ValueError(f"params{where}: keys differ: ours-only {sorted(set(ours) - set(theirs))}"
                         f", gemma-only {sorted(set(theirs) - set(ours))}")
    for key in ours:
        a, b = ours[key], theirs[key]
        if isinstance(b, dict):
            check_same_tree(a, b, f"{where}/{key}")
        elif tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"params{where}/{key}: shape {a.shape}, gemma wants {b.shape}")


def init_lora(abstract: dict, seed: int) -> dict:
    """A kaiming-uniform like gemma's initializer (fan-in = all dims but the rank), B = 0."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['b']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = math.sqrt(6.0 / math.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    return jax.tree.map_with_path(init, abstract)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    batch = np.load(spec["batch"])
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    targets = jnp.asarray(batch["targets"], bool)

    base_model = gm.nn.Gemma3_270M(dtype=jnp.float32)
    wrapper = AttentionLoRA if spec["lora"] == "attention" else gm.nn.LoRA
    model = wrapper(rank=spec["rank"], model=base_model, dtype=jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    abstract_base, abstract_lora = peft.split_params(abstract)

    with np.load(spec["params"]) as flat:
        base = unflatten({k: flat[k] for k in flat.files})
    check_same_tree(base, drop_empty(abstract_base))
    lora = init_lora(abstract_lora, seed=0)
    lora_params = sum(x.size for x in jax.tree.leaves(lora))

    optimizer = optax.chain(optax.clip_by_global_norm(spec["clip_norm"]),
                            optax.adamw(spec["learning_rate"], weight_decay=0.0))
    opt_state = optimizer.init(lora)

    def loss_fn(lora, base, tokens, targets):
        params = peft.merge_params(base, lora)
        logits = model.apply({"params": params}, tokens).logits  # B T V, every position
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        mask = targets[:, 1:]
        return jnp.sum(jnp.where(mask, token_loss, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    @jax.jit
    def train_step(lora, opt_state, base, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    start = time.perf_counter()
    train_step = train_step.lower(lora, opt_state, base, tokens, targets).compile()
    compile_s = time.perf_counter() - start
    reset_ok = reset_peak_rss()
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        lora, opt_state, loss = train_step(lora, opt_state, base, tokens, targets)
        losses.append(float(loss))  # blocks until the step is done
        times.append(time.perf_counter() - start)
    timed = times[spec["warmup"]:]
    result = {
        "framework": f"gemma {__import__('gemma').__version__} (jax {jax.__version__})",
        "lora": spec["lora"], "lora_params": int(lora_params),
        "compile_s": compile_s, "first_step_s": times[0], "step_times_s": timed,
        "step_s": statistics.median(timed),
        "first_loss": losses[0], "losses": losses,
        "train_peak_rss_mb": rss_mb("VmHWM") if reset_ok else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    main(sys.argv[1])
