"""Which matmuls of the train step XLA:CPU would hand to oneDNN (AMX on CPUs that have it).

XLA rewrites a dot to the `__onednn$matmul` custom call (xla/service/cpu/
onednn_contraction_rewriter.cc, ShouldRewriteDot) only on a CPU with bf16 matrix support, when
its result is f32 or bf16, the operands and result are row-major after layout assignment, it
contracts one dimension (DotDecomposer merges several into one) in one of the last two
positions, the output rank is at most each operand's, and it is big enough: at least 2^24 FLOPs
for a plain matrix product, 2^19 for a batched one. The rest are upcast to f32 and run by
XLA's own kernels. This lists every dot of the jaxpr of the step (the main job's shapes by
default) with its FLOPs and whether it passes the shape and size rules; the layout rule is
XLA's choice and shows only in the compiled HLO on an AMX machine
(`XLA_FLAGS=--xla_dump_to=...`: count the `__onednn$matmul` calls).

    python scripts/onednn_dots.py --dtype bfloat16 [--batch 4 --seq 256 --targets 16]
"""

from __future__ import annotations

import argparse
import collections
import math

import jax
import jax.numpy as jnp
from jax._src.interpreters import partial_eval as pe

from kaggle_pipeline.model import Transformer, abstract_params
from kaggle_pipeline.model.config import get_config
from kaggle_pipeline.model.lora import LoraConfig, init_lora
from kaggle_pipeline.model.loss import sequence_loss


def dots(jaxpr, scale: int = 1):
    """(dot_general equation, times it runs) of a jaxpr and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn, scale
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from dots(inner, scale * trips)


def classify(eqn) -> tuple[str, float, bool]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    contract = math.prod(lhs.shape[d] for d in lc)
    flops = 2.0 * math.prod(out.shape) * contract
    # After DotDecomposer: [batch, M, K] x [batch, K, N], each side's free dims merged.
    big = flops >= (2**19 if lb else 2**24)
    ok = out.dtype in (jnp.float32, jnp.bfloat16) and big
    name = (f"{lhs.dtype.name}{list(lhs.shape)} x {rhs.dtype.name}{list(rhs.shape)} -> "
            f"{out.dtype.name}{list(out.shape)}")
    return name, flops, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma3-270m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--targets", type=int, default=16)
    args = parser.parse_args()
    config = get_config(args.preset)
    dtype = jnp.dtype(args.dtype)
    lora_cfg = LoraConfig()
    model = Transformer(config, dtype=dtype, lora_scale=lora_cfg.scale)
    params = abstract_params(config, dtype)
    lora = jax.eval_shape(lambda: init_lora(config, lora_cfg, jax.random.key(0)))
    shape = (args.batch, args.seq)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
             for k in ("tokens", "positions", "segment_ids")}
    batch["loss_src"] = jax.ShapeDtypeStruct((args.batch, args.targets), jnp.int32)
    batch["loss_valid"] = jax.ShapeDtypeStruct((args.batch, args.targets), jnp.bool_)

    def loss(lora, params, batch):
        return sequence_loss(model, {"params": params, "lora": lora}, batch)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora, params, batch).jaxpr
    # Drop what the gradient does not use (the frozen weights' gradients), as XLA's DCE does.
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    rows = collections.defaultdict(lambda: [0, 0.0, False])
    for eqn, times in dots(jaxpr):
        name, flops, ok = classify(eqn)
        rows[name][0] += times
        rows[name][1] += flops * times
        rows[name][2] = ok
    total = sum(r[1] for r in rows.values())
    eligible = sum(r[1] for r in rows.values() if r[2])
    print(f"{args.preset} {dtype.name} {args.batch}x{args.seq}: {len(rows)} dot shapes, "
          f"{total / 1e9:.1f} GFLOP per step, {100 * eligible / total:.1f}% of it in dots "
          "oneDNN takes (if XLA lays them out row-major)")
    print("| dot | count | GFLOP | oneDNN |")
    print("|---|---|---|---|")
    for name, (count, flops, ok) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {count} | {flops / 1e9:.2f} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
