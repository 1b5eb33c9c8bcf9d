"""`python -m kaggle_pipeline.plan [--config run.toml] [key=value ...] --target v3-8 [--json]`

Says before a long session whether a run fits: compiles, ahead of time and for the target's
devices, the programs the run will execute (the train step, label scoring, one generation step)
from the run config, with abstract params (nothing is loaded or allocated), and prints per
program the bytes each device holds (arguments, temporaries, peak), the FLOPs of one call, the
compile time, and whether it fits the target's memory (else the setting to change).

Targets: `cpu` (this machine's CPU devices), `local` (whatever jax sees here) or a TPU slice
compiled for on this machine through libtpu (`pip install '.[tpu-plan]'`): `v3-8` (Kaggle's
TPU v3-8: 8 cores of 16 GiB), `v5e-8`, `v4-8`. Exit status 0 when every program fits, 3 when
one does not (2: a config error).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from kaggle_pipeline import run_setup
from kaggle_pipeline.cli import run_command
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.inference.predictions import MAX_NEW_TOKENS
from kaggle_pipeline.model import init_cache, sharding
from kaggle_pipeline.model.config import AttentionKind, ModelConfig
from kaggle_pipeline.model.loss import target_logprobs
from kaggle_pipeline.run_config import RunConfig, load_config
from kaggle_pipeline.training.optimizer import make_optimizer
from kaggle_pipeline.training.step import BATCH_KEYS, Trainer, abstract_batch

EXIT_DOES_NOT_FIT = 3
GIB = 2**30
PROGRAMS = ("train", "score", "decode")
# Label scoring runs twice the training batch (predict.classification_scores) with up to this
# many label tokens per row.
SCORE_TARGETS = 16


@dataclasses.dataclass(frozen=True)
class Target:
    topology: str  # jax.experimental.topologies name
    memory_per_device: int  # bytes of HBM per jax device
    peak_bf16_flops: float  # per device, for MFU figures


# Per-device HBM: v3 has 16 GiB per core (2 cores a chip), of which XLA gives a program 15.48
# GiB (its own out-of-memory message); v5e 16 GiB per chip (one core); v4 32 GiB per chip,
# which this topology shows as 2 devices. Where XLA's share was not seen, 15.48/16 of it.
TPU_TARGETS = {
    "v3-8": Target("v3:2x2", int(15.48 * GIB), 61.5e12),
    "v5e-8": Target("v5e:2x4", int(15.48 * GIB), 197e12),
    "v4-8": Target("v4:2x2x1", int(15.48 * GIB), 137.5e12),
}


class PlanError(UserError):
    """A target this machine cannot compile for."""


def target_devices(name: str) -> tuple[list, int]:
    """(devices, memory per device in bytes) of a target."""
    if name in TPU_TARGETS:
        target = TPU_TARGETS[name]
        # Compiling for a topology touches no TPU: let libtpu load beside other processes
        # that hold its lock file (another plan, a jax that probed for a TPU).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if not os.environ.get("JAX_PLATFORMS"):  # no TPU runtime needed to compile for one
            jax.config.update("jax_platforms", "cpu")
        try:
            from jax.experimental import topologies

            topology = topologies.get_topology_desc(target.topology, "tpu")
        except Exception as err:  # no libtpu, or one that does not match jax
            raise PlanError(f"--target {name}: cannot compile for TPU here ({err}); install "
                            "libtpu with `pip install '.[tpu-plan]'`") from None
        return list(topology.devices), target.memory_per_device
    if name not in ("cpu", "local"):
        raise PlanError(f"--target {name!r}: one of cpu, local, {', '.join(TPU_TARGETS)}")
    devices = jax.devices("cpu") if name == "cpu" else jax.devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return devices, int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return devices, host // len(devices)  # CPU devices share the host's memory


@dataclasses.dataclass
class Setup:
    """What every program is built from: the run's model on the target's mesh, abstractly."""

    cfg: RunConfig
    config: ModelConfig
    mesh: object
    params: dict  # ShapeDtypeStructs with their shardings
    lora: dict | None

    @property
    def variables(self) -> dict:
        return {"params": self.params} | ({"lora": self.lora} if self.lora is not None else {})


def make_setup(cfg: RunConfig, config: ModelConfig, devices: list) -> Setup:
    mesh = run_setup.build_mesh(cfg, devices)
    params, lora = run_setup.abstract_variables(cfg, config, mesh)
    return Setup(cfg, config, mesh, params, lora)


def lower_train(s: Setup, targets: int):
    cfg = s.cfg
    model = run_setup.transformer(cfg.model, s.config, s.mesh, lora_scale=cfg.lora.scale,
                                  lora_dropout=cfg.lora.dropout if cfg.lora.enabled else 0.0,
                                  deterministic=False)
    trainer = Trainer(model, make_optimizer(cfg.optim, 1000), s.mesh,
                      "lora" if cfg.lora.enabled else "full")
    trainable = s.lora if cfg.lora.enabled else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), s.params)
    state = trainer.abstract_state(trainable)
    frozen = s.params if cfg.lora.enabled else {}
    batch = trainer.abstract_batch(cfg.data.batch_size, cfg.data.seq_len, targets)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return trainer.compile_step(state, frozen).lower(state, frozen, batch), tokens


def lower_score(s: Setup):
    cfg = s.cfg
    model = run_setup.transformer(cfg.model, s.config, s.mesh, lora_scale=cfg.lora.scale)
    rows = 2 * cfg.data.batch_size
    batch = abstract_batch(BATCH_KEYS, rows, cfg.data.seq_len, SCORE_TARGETS, s.mesh)
    variables = s.variables
    fn = jax.jit(functools.partial(target_logprobs, model),
                 out_shardings=sharding.batch_sharding(s.mesh))
    return fn.lower(variables, batch), rows * cfg.data.seq_len


def lower_decode(s: Setup):
    """One cached generation step of the batch over a cache as long as prompt + answer."""
    cfg = s.cfg
    model = run_setup.transformer(cfg.model, s.config, s.mesh, lora_scale=cfg.lora.scale)
    rows = cfg.data.batch_size
    cache = jax.eval_shape(functools.partial(init_cache, s.config, rows,
                                             cfg.data.seq_len + MAX_NEW_TOKENS, model.dtype))
    cache = sharding.placed_shapes(cache, sharding.cache_shardings(cache, s.mesh))
    rows_sh = sharding.batch_sharding(s.mesh)
    token = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_sh)

    def step(variables, token, position, cache):
        logits, cache = model.apply(variables, token, position, jnp.ones_like(token), cache)
        return jnp.argmax(logits[:, 0], axis=-1), cache

    fn = jax.jit(step, out_shardings=(rows_sh, sharding.cache_shardings(cache, s.mesh)),
                 donate_argnums=(3,))
    return fn.lower(s.variables, token, token, cache), rows


_OUT_OF_MEMORY = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def model_flops_per_token(config: ModelConfig, seq_len: int, unembedded: float,
                          passes: int) -> float:
    """Matmul FLOPs per token of the model (not of remat's recomputation): 2 per weight per
    token, attention over the keys each query sees (half the sequence, or the window),
    unembedding at `unembedded` positions per token; `passes`: 1 forward, 2 forward and the
    activations' backward (LoRA), 3 with the weights' gradients too (full fine-tuning).
    XLA's own count (`xla_flops_per_device`) sees a scanned loop's body once."""
    c = config
    d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
    weights = 2 * n * d * h + 2 * k * d * h + 3 * d * f
    attention = sum(4 * n * h * (min(c.sliding_window, (seq_len + 1) / 2)
                                 if kind == AttentionKind.LOCAL else (seq_len + 1) / 2)
                    for kind in c.attention_kinds)
    forward = 2 * weights * c.num_layers + attention + 2 * c.vocab_size * d * unembedded
    return forward * passes


def measure(lowered, memory: int) -> dict:
    # Wall time, and the CPU time of this process's threads (steadier on a shared machine).
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        # XLA:TPU refuses a program whose temporaries alone exceed the HBM: it does not fit.
        found = _OUT_OF_MEMORY.search(str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or not found:
            raise
        temp = int(float(found[1]) * 1024 ** " KMGT".index(found[2] or " "))
        return {"temp_bytes_per_device": temp, "peak_bytes_per_device": temp,
                "compile_seconds": round(time.perf_counter() - start, 1),
                "compile_cpu_seconds": round(time.process_time() - cpu_start, 1), "fits": False,
                "compiler": str(err).splitlines()[0][:300]}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))  # of one device's partition of the program
    return {
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "alias_bytes_per_device": int(mem.alias_size_in_bytes),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "peak_bytes_per_device": int(peak),
        "xla_flops_per_device": flops,
        "compile_seconds": round(seconds, 1),
        "compile_cpu_seconds": round(cpu_seconds, 1),
        "fits": peak <= memory,
    }


def advice(cfg: RunConfig, program: str, devices: int) -> list[str]:
    """Settings to change, the first the likeliest to help without changing the results."""
    out = []
    m, t, d = cfg.model, cfg.train, cfg.data
    if program == "train" and not m.remat:
        out.append("model.remat=true")
    if program == "train" and m.remat and m.remat_policy != "full":
        out.append("model.remat_policy=full")
    if t.mesh_fsdp * t.mesh_model < devices:
        out.append(f"train.mesh_fsdp={devices // t.mesh_model} (params sharded over all cores)")
    if m.param_dtype == "float32":
        out.append("model.param_dtype=bfloat16")
    if d.batch_size > 1:
        out.append(f"data.batch_size={max(1, d.batch_size // 2)} (with "
                   f"optim.accumulate_steps={2 * cfg.optim.accumulate_steps} for the same "
                   "update)")
    if d.seq_len > 128:
        out.append(f"data.seq_len={d.seq_len // 2}")
    return out


def plan(cfg: RunConfig, target: str, programs: tuple[str, ...] = PROGRAMS,
         targets_per_row: int | None = None, memory_gb: float | None = None) -> dict:
    config = run_setup.model_config(cfg.model)
    devices, memory = target_devices(target)
    if memory_gb is not None:
        memory = int(memory_gb * GIB)
    s = make_setup(cfg, config, devices)
    if targets_per_row is None:  # every token a target, or a few label tokens per row
        targets_per_row = cfg.data.seq_len if cfg.data.loss_on == "answer" else SCORE_TARGETS
    compute, param_dtype = run_setup.dtypes(cfg.model, s.mesh)
    result = {"target": target, "devices": len(devices), "device_kind": devices[0].device_kind,
              "memory_per_device": memory, "mesh": dict(s.mesh.shape),
              "model": {"family": config.family, "layers": config.num_layers,
                        "params": config.num_params(), "dtype": compute.name,
                        "param_dtype": param_dtype.name, "remat": cfg.model.remat,
                        "remat_policy": cfg.model.remat_policy,
                        "scan_layers": cfg.model.scan_layers,
                        "lora": cfg.lora.enabled, "batch_size": cfg.data.batch_size,
                        "seq_len": cfg.data.seq_len},
              "programs": {}}
    lower = {"train": lambda: lower_train(s, targets_per_row), "score": lambda: lower_score(s),
             "decode": lambda: lower_decode(s)}
    seq = cfg.data.seq_len
    flops = {  # per token: training, scoring (forward), one decode step over a full cache
        "train": model_flops_per_token(config, seq, targets_per_row / seq,
                                       2 if cfg.lora.enabled else 3),
        "score": model_flops_per_token(config, seq, SCORE_TARGETS / seq, 1),
        "decode": model_flops_per_token(config, 2 * (seq + MAX_NEW_TOKENS), 1, 1),
    }
    for name in programs:
        lowered, tokens = lower[name]()
        row = measure(lowered, memory)
        row["flops_per_token"] = flops[name]
        row["flops_per_step"] = flops[name] * tokens
        if not row["fits"]:
            row["advice"] = advice(cfg, name, len(devices))
        result["programs"][name] = row
    result["fits"] = all(p["fits"] for p in result["programs"].values())
    return result


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(result: dict) -> str:
    m = result["model"]
    head = (f"{result['target']}: {result['devices']} x {result['device_kind']}, "
            f"{_gb(result['memory_per_device'])} GB each; mesh {result['mesh']}\n"
            f"model: {m['family']}, {m['layers']} layers, {m['params'] / 1e9:.2f}B params, "
            f"{'LoRA' if m['lora'] else 'full fine-tuning'}, compute {m['dtype']}, params "
            f"{m['param_dtype']}, remat {m['remat_policy'] if m['remat'] else 'off'}, "
            f"scan_layers {str(m['scan_layers']).lower()}, batch {m['batch_size']} x "
            f"{m['seq_len']}\n")
    lines = ["| program | args GB | temp GB | peak GB/device | fits | GFLOP/token | "
             "compile s |", "|---|---|---|---|---|---|---|"]
    notes = []
    for name, p in result["programs"].items():
        lines.append(f"| {name} | {_gb(p.get('argument_bytes_per_device', 0))} | "
                     f"{_gb(p['temp_bytes_per_device'])} | {_gb(p['peak_bytes_per_device'])} | "
                     f"{'yes' if p['fits'] else 'NO'} | {p['flops_per_token'] / 1e9:.2f} | "
                     f"{p['compile_seconds']} |")
        if not p["fits"]:
            notes.append(f"{name} does not fit; try: " + "; ".join(p["advice"]))
    return head + "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("--target", default="local",
                        help=f"cpu, local or a TPU slice: {', '.join(TPU_TARGETS)}")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help="which of train,score,decode to compile")
    parser.add_argument("--targets-per-row", type=int, default=None,
                        help="loss positions per row (default: seq_len for loss_on=answer, "
                             f"{SCORE_TARGETS} for label)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory per device instead of the target's")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    def body() -> int:
        programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
        unknown = sorted(set(programs) - set(PROGRAMS))
        if unknown:
            raise PlanError(f"--programs: unknown {unknown}; one of {', '.join(PROGRAMS)}")
        result = plan(load_config(args.config, args.overrides), args.target, programs,
                      args.targets_per_row, args.memory_gb)
        print(json.dumps(result) if args.json else format_table(result), flush=True)
        return 0 if result["fits"] else EXIT_DOES_NOT_FIT

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
