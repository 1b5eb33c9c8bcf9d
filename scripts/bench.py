"""Benchmarks kaggle-pipeline against transformers + peft and DeepMind's gemma on this CPU.

    python scripts/bench.py --out bench.json               # the full run (on a quiet machine)
    python scripts/bench.py --quick --out /tmp/quick.json  # a few small steps of every part

Everything uses the real Gemma 3 270M (the packaged GGUF) on the CPU, offline, with
--threads (default 2) threads for torch and BLAS; XLA uses every core. Every worker, whatever
its framework, runs with the same host allocator (--malloc; the header says which).
Parts (--parts, comma-separated; default all of them):
  train   one LoRA train step (q, k, v, o, rank 8, alpha 16, AdamW, clip 1.0) on the same batch
          (random token ids, the loss on the last --targets tokens of each row):
            ours-f32   kaggle_pipeline's jitted Trainer step, f32 compute
            ours-bf16  the same with model.dtype = bfloat16
            ours-auto  the precision model.dtype = "auto" picks on this CPU (needs the
                       precision policy's model.config.resolve_dtype)
            hf         transformers + peft the way a HF user writes it: full logits, labels -100
            hf-keep    the same, logits only where the loss is (`logits_to_keep`)
            hf-amp     hf-keep under torch.autocast("cpu", bfloat16)
            gemma    DeepMind's gemma (.venv-ref): gm.nn.LoRA's wrappers on the attention
                     einsums (its kv einsum shares one A for k and v; no alpha scaling), optax
                     adamw, full logits then masked cross-entropy, jitted
          tokens/s; MFU = model FLOP/s (see flops_per_step) / the best matmul rate this run
          measures with jax, numpy and torch in the variant's precision (bf16 for ours-bf16 and
          hf-amp); peak RSS; step-1 losses, which must agree (same weights, LoRA B = 0)
  keras   the review job as the Keras tutorials run it (every review padded to 512 tokens, batch
          1, 5 epochs, logits at all 512 positions; the loss mask is the job's), emulated with our
          model, vs the default job of run_config (packing, logits only at loss positions): a
          few steps timed and extrapolated; --full-job also runs the real default train phase
  peak    matmul GFLOP/s of numpy, torch and jax at --matmul-sizes, f32 and bf16 (bf16 operands,
          f32 accumulation); run by `train` too, for MFU
  decode  greedy decoding, no stop token, at batch 1, 8 and 32 (--decode-batches): our Sampler
          (--decode-impls ours-f32, ours-bf16, ours-auto) vs transformers' generate on the same
          prompts; ours-f32 and hf must give identical tokens (exit 1 if not); decode tok/s
          leaves the prefill out
  load    peak RSS while loading the GGUF, HF safetensors and Orbax checkpoints, over the RSS
          after imports, divided by the bytes of the loaded f32 params

Each measurement runs in a fresh subprocess (`--worker NAME SPEC.json`), so peak RSS and thread
pools belong to one framework only; this parent process imports neither jax nor torch.
Exported weights (f32 .npz for gemma, HF and Orbax copies) are cached in --work-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
REFERENCE_VENV = Path(os.environ.get("REFERENCE_VENV", PROJECT / ".venv-ref"))
PARTS = ("peak", "train", "keras", "decode", "load")
TRAIN_VARIANTS = ("ours-f32", "ours-bf16", "hf", "hf-keep", "hf-amp", "gemma")
# ours-auto: the precision `model.dtype = "auto"` picks for this CPU (see resolve_dtype).
EXTRA_TRAIN_VARIANTS = ("ours-auto", "ours-ynn", "gemma-ynn", "gemma-all")
DECODE_IMPLS = ("ours-f32", "hf")  # also: ours-bf16, ours-auto
# CPU features that decide whether bf16 matmuls can beat f32 (AMX tiles, AVX-512 bf16 dots).
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")
LOAD_FORMATS = ("gguf", "hf-float32", "hf-bfloat16", "orbax-float32", "orbax-bfloat16")
PREP_VERSION = 1  # bump when what `prep` writes changes
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"  # XLA's YNNPACK fusions (opt-in)
KERAS_SEQ_LEN, KERAS_BATCH, KERAS_EPOCHS = 512, 1, 5  # the Keras Gemma tutorials' recipe
LEARNING_RATE, CLIP_NORM = 1e-4, 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int = 4
    seq_len: int = 256
    targets: int = 16  # loss positions per row: the last `targets` tokens
    warmup: int = 2  # untimed steps before the timed ones (jax compiles ahead of them)
    steps: int = 10  # timed steps
    keras_warmup: int = 1  # untimed steps after compiling
    keras_steps: int = 8
    new_tokens: int = 32
    decode_runs: int = 3
    decode_batches: tuple[int, ...] = (1, 8, 32)
    matmul_sizes: tuple[int, ...] = (2048, 4096)
    matmul_reps: int = 5
    threads: int = 2
    load_formats: tuple[str, ...] = LOAD_FORMATS


QUICK = Settings(batch=1, seq_len=128, targets=8, warmup=1, steps=2, keras_warmup=0,
                 keras_steps=1, new_tokens=8, decode_runs=1, decode_batches=(1, 4),
                 matmul_sizes=(2048,),
                 matmul_reps=2,
                 load_formats=("gguf", "hf-float32", "orbax-float32"))


# ------------------------------------------------------------------------------ memory


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak since the last reset (VmHWM) resident set size, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Linux sets VmHWM back to the current RSS when 5 is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def max_rss_mb() -> float:
    """The process's lifetime peak RSS (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ shared by workers


def model_config(fields: dict):
    from kaggle_pipeline.model.config import AttentionKind, ModelConfig

    return ModelConfig(**{**fields, "attention_kinds": tuple(
        AttentionKind(k) for k in fields["attention_kinds"])})


def resolve_dtype(name: str):
    """A compute dtype from a variant's suffix: f32, bf16, or auto (what `model.dtype = "auto"`
    chooses on this machine, once the precision policy provides
    `kaggle_pipeline.model.config.resolve_dtype`)."""
    import jax.numpy as jnp

    if name == "auto":
        from kaggle_pipeline.model import config

        if not hasattr(config, "resolve_dtype"):
            raise SystemExit("ours-auto needs model.dtype = \"auto\" "
                             "(kaggle_pipeline.model.config.resolve_dtype), not in this checkout")
        return jnp.dtype(config.resolve_dtype("auto"))
    return jnp.dtype({"f32": "float32", "bf16": "bfloat16"}.get(name, name))


def load_params(work: Path) -> tuple[object, dict]:
    """(config, params as numpy) from the f32 export of the GGUF that `prep` wrote."""
    from kaggle_pipeline.checkpoints.common import unflatten

    meta = json.loads((work / "meta.json").read_text())
    with np.load(work / "params.npz") as flat:
        params = unflatten({k: flat[k] for k in flat.files})
    return model_config(meta["config"]), params


def train_batch(path: Path) -> dict[str, np.ndarray]:
    """The train part's batch: one segment per row, targets on the last tokens."""
    with np.load(path) as data:
        tokens, targets = data["tokens"], data["targets"]
    b, t = tokens.shape
    return {"tokens": tokens, "targets": targets,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32)}


def compile_ahead(trainer, state, frozen, batch) -> tuple[object, float]:
    """The train step compiled for these shapes, and how long compiling took."""
    start = time.perf_counter()
    step = trainer.compile_step(state, frozen).lower(state, frozen, batch).compile()
    return step, time.perf_counter() - start


def timed_steps(run_step, warmup: int, steps: int) -> dict:
    """Calls run_step() (which must block until done) warmup + steps times."""
    times, values = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        values.append(run_step())
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    return {"first_step_s": times[0], "step_times_s": timed, "step_s": statistics.median(timed),
            "values": values}


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ workers


def worker_prep(spec: dict) -> dict:
    """Exports the GGUF's params once: f32 .npz, HF safetensors, Orbax; prompts; meta.json."""
    import jax.numpy as jnp

    import kaggle_pipeline  # noqa: F401  (sets the XLA flag)
    from kaggle_pipeline.checkpoints import load_checkpoint, save_hf
    from kaggle_pipeline.checkpoints.common import flatten
    from kaggle_pipeline.checkpoints.orbax_format import save_orbax
    from kaggle_pipeline.data.chat_template import encode_prompt
    from kaggle_pipeline.data.tasks import build_examples, get_task, load_records
    from kaggle_pipeline.data.tokenizer import Tokenizer
    from kaggle_pipeline.run_config import load_config, resolve_input

    work, gguf = Path(spec["work"]), Path(spec["gguf"])
    log(f"prep: loading {gguf}")
    config, params = load_checkpoint(gguf)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    if not (work / "params.npz").exists():
        fd, tmp = tempfile.mkstemp(dir=work, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, work / "params.npz")
    for name in spec["exports"]:
        target = work / name
        if target.exists():
            continue
        kind, dtype = name.split("-")
        log(f"prep: writing {target}")
        if kind == "hf":
            save_hf(params, config, target, dtype=jnp.dtype(dtype))
        else:
            save_orbax(params, target, dtype=jnp.dtype(dtype))
    tokenizer = Tokenizer.from_gguf(gguf)
    task = get_task("tarr-sentiment")
    table = load_records(task, resolve_input(load_config().data.train))
    prompts = [encode_prompt(tokenizer, e.prompt, task.style).tolist()
               for e in build_examples(task, table.frame)[:16]]
    fields = dataclasses.asdict(config)
    fields["attention_kinds"] = [k.value for k in config.attention_kinds]
    meta = {"stamp": spec["stamp"], "config": fields, "prompts": prompts,
            "params": int(sum(v.size for v in flat.values())),
            "param_bytes_f32": int(sum(v.nbytes for v in flat.values()))}
    atomic_write_text(work / "meta.json", json.dumps(meta))
    return {}


def worker_peak(spec: dict) -> dict:
    """Best matmul GFLOP/s of one library at each size, in f32 or in bf16 (bf16 operands, f32
    accumulation: torch's CPU bf16 matmul accumulates in f32; jax asks for it with
    preferred_element_type). numpy has no bf16 matmul: its bf16 entry is left out."""
    lib, threads, dtype = spec["lib"], spec["threads"], spec.get("dtype", "f32")
    rng = np.random.default_rng(0)
    out: dict = {"dtype": dtype}
    for n in spec["sizes"]:
        a = rng.standard_normal((n, n), np.float32)
        b = rng.standard_normal((n, n), np.float32)
        if lib == "numpy":
            if dtype != "f32":
                return {"dtype": dtype, "skipped": "numpy has no bf16 matmul"}

            def matmul(a=a, b=b):
                return a @ b
        elif lib == "torch":
            import torch

            torch.set_num_threads(threads)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            if dtype == "bf16":
                ta, tb = ta.bfloat16(), tb.bfloat16()

            def matmul(ta=ta, tb=tb):
                return torch.mm(ta, tb)
        else:
            import jax
            import jax.numpy as jnp

            ja, jb = jnp.asarray(a), jnp.asarray(b)
            if dtype == "bf16":
                ja, jb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
            dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))

            def matmul(ja=ja, jb=jb, dot=dot):
                return dot(ja, jb).block_until_ready()
        matmul()  # warm-up (and compile)
        best = min(timed_steps(matmul, 0, spec["reps"])["step_times_s"])
        out[str(n)] = 2 * n**3 / best / 1e9
    out["best_gflops"] = max(v for k, v in out.items() if k.isdigit())
    if lib == "jax":
        out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return out


def worker_train_ours(spec: dict) -> dict:
    import jax

    import kaggle_pipeline  # noqa: F401  (sets the XLA flag)
    from kaggle_pipeline.model import Transformer
    from kaggle_pipeline.model.lora import LoraConfig, count_params, init_lora
    from kaggle_pipeline.model.loss import add_target_slots
    from kaggle_pipeline.model.sharding import make_mesh
    from kaggle_pipeline.training.optimizer import OptimConfig, make_optimizer
    from kaggle_pipeline.training.step import Trainer

    config, params = load_params(Path(spec["work"]))
    batch = train_batch(Path(spec["batch"]))
    lora = LoraConfig(rank=spec["rank"], alpha=spec["alpha"], targets=("q", "k", "v", "o"))
    optim = OptimConfig(learning_rate=LEARNING_RATE, schedule="constant", weight_decay=0.0,
                        clip_norm=CLIP_NORM)
    dtype = resolve_dtype(spec.get("dtype", "f32"))
    model = Transformer(config, dtype=dtype, lora_scale=lora.scale, deterministic=False)
    trainer = Trainer(model, make_optimizer(optim, 1000), make_mesh(), "lora")
    state = trainer.init_state(init_lora(config, lora, jax.random.key(0)))
    frozen = jax.device_put(params, trainer.frozen_shardings(params))
    del params
    device_batch = trainer.put_batch(add_target_slots(batch, spec["targets"]))
    step, compile_s = compile_ahead(trainer, state, frozen, device_batch)
    reset_ok = reset_peak_rss()

    def run_step():
        nonlocal state
        state, metrics = step(state, frozen, device_batch)
        return float(metrics["loss"])

    timing = timed_steps(run_step, spec["warmup"], spec["steps"])
    return {**timing, "compile_s": compile_s,
            "framework": f"kaggle_pipeline (jax {jax.__version__})",
            "first_loss": timing["values"][0], "lora_params": count_params(state["trainable"]),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "dtype": str(dtype),
            "train_peak_rss_mb": rss_mb("VmHWM") if reset_ok else None}


def worker_train_hf(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    batch = train_batch(Path(spec["batch"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(spec["work"]) / "hf-float32", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    tokens = torch.from_numpy(batch["tokens"]).long()
    attention_mask = torch.ones_like(tokens)
    targets = torch.from_numpy(batch["targets"])
    k = spec["targets"]
    if not bool(targets[:, -k:].all()) or int(targets.sum()) != k * len(tokens):
        raise ValueError(f"the train batch must have exactly its last {k} tokens as targets")
    labels = torch.where(targets, tokens, torch.full_like(tokens, -100))

    def loss_of_batch():
        if spec["variant"] == "full":  # what a HF user writes: logits everywhere, -100 labels
            return model(input_ids=tokens, attention_mask=attention_mask, labels=labels,
                         use_cache=False).loss
        # Logits only at the k + 1 last positions; position i predicts token i + 1.
        # "amp": the same under bf16 autocast (bf16 matmuls, f32 weights and optimizer).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["variant"] == "amp"):
            logits = model(input_ids=tokens, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=k + 1).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, -k:].reshape(-1))

    reset_ok = reset_peak_rss()

    def run_step():
        loss = loss_of_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    timing = timed_steps(run_step, spec["warmup"], spec["steps"])
    return {**timing, "framework": f"transformers {transformers.__version__} + peft "
                                   f"{peft.__version__} (torch {torch.__version__})",
            "attention": model.config._attn_implementation, "first_loss": timing["values"][0],
            "lora_params": sum(p.numel() for p in trainable),
            "train_peak_rss_mb": rss_mb("VmHWM") if reset_ok else None}


def _job_model(cfg, config, params: dict, total_steps: int):
    """The default job's model, trainer and state (as kaggle_pipeline.train.run builds them)."""
    import jax
    import jax.numpy as jnp

    from kaggle_pipeline.model import Transformer
    from kaggle_pipeline.model.lora import init_lora
    from kaggle_pipeline.model.sharding import make_mesh
    from kaggle_pipeline.training.optimizer import make_optimizer
    from kaggle_pipeline.training.step import Trainer

    params = jax.tree.map(lambda p: jnp.asarray(p, cfg.model.param_dtype), params)
    full = not cfg.lora.enabled
    lora = cfg.lora
    model = Transformer(config, dtype=cfg.model.dtype, lora_scale=lora.scale,
                        lora_dropout=0.0 if full else lora.dropout, deterministic=False,
                        remat=cfg.model.remat)
    updates = max(1, math.ceil(total_steps / cfg.optim.accumulate_steps))
    mesh = make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp, cfg.train.mesh_model)
    trainer = Trainer(model, make_optimizer(cfg.optim, updates), mesh,
                      "full" if full else "lora", seed=cfg.train.seed)
    trainable = params if full else init_lora(config, lora, jax.random.key(cfg.train.seed))
    frozen = {} if full else jax.device_put(params, trainer.frozen_shardings(params))
    state = trainer.init_state(trainable)
    return trainer, state, frozen


def all_position_slots(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Loss slots at every position (Keras computes logits at all of them): slot i is position i,
    valid where token i + 1 is a target; the last slot has no next token and stays invalid."""
    b, t = batch["tokens"].shape
    src = np.zeros((b, t), np.int32)
    src[:, : t - 1] = np.arange(t - 1, dtype=np.int32)
    valid = np.zeros((b, t), bool)
    valid[:, : t - 1] = batch["targets"][:, 1:]
    return {**batch, "loss_src": src, "loss_valid": valid}


def worker_keras(spec: dict) -> dict:
    """mode "padded": the Keras recipe on all reviews; "packed": the default job's steps."""
    import jax

    import kaggle_pipeline  # noqa: F401  (sets the XLA flag)
    from kaggle_pipeline.data.packing import batches, num_batches, pack
    from kaggle_pipeline.data.tasks import build_examples, load_records, train_validation_split
    from kaggle_pipeline.data.tokenizer import Tokenizer
    from kaggle_pipeline.model.loss import add_target_slots, max_targets_per_row
    from kaggle_pipeline.run_config import load_config, resolve_input
    from kaggle_pipeline.run_setup import task_spec
    from kaggle_pipeline.train import encode_examples

    cfg = load_config(None, spec["overrides"])
    config, params = load_params(Path(spec["work"]))
    tokenizer = Tokenizer.from_gguf(spec["gguf"])
    task = task_spec(cfg)
    table = load_records(task, resolve_input(cfg.data.train), on_bad_row=cfg.data.on_bad_row)
    if spec["mode"] == "padded":
        # The tutorials train on every labelled example, each padded to 512 tokens, batch 1.
        examples = build_examples(task, table.frame)
        rows, stats = pack(encode_examples(examples, tokenizer, task, cfg.data.loss_on),
                           KERAS_SEQ_LEN, pack_rows=False)
        batch_size, epochs, seq_len = KERAS_BATCH, KERAS_EPOCHS, KERAS_SEQ_LEN
        total_steps = num_batches(len(rows), batch_size) * epochs
        step_batches = list(batches(rows, batch_size, seed=0, epoch=0, shuffle=False))
        step_batches = [all_position_slots(b) for b in step_batches]
        logit_positions = seq_len * batch_size
    else:
        train_frame, _ = train_validation_split(
            table.frame, validation_fraction=cfg.data.validation_fraction, seed=cfg.train.seed,
            stratify_by=task.stratify_column)
        examples = build_examples(task, train_frame)
        rows, stats = pack(encode_examples(examples, tokenizer, task, cfg.data.loss_on),
                           cfg.data.seq_len, pack_rows=cfg.data.pack)
        batch_size, epochs, seq_len = cfg.data.batch_size, cfg.train.epochs, cfg.data.seq_len
        total_steps = num_batches(len(rows), batch_size) * epochs
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        width = max_targets_per_row(rows)
        step_batches = [add_target_slots(b, width)
                        for b in batches(rows, batch_size, seed=cfg.train.seed, epoch=0)]
        logit_positions = width * batch_size
    trainer, state, frozen = _job_model(cfg, config, params, total_steps)
    del params
    device_batches = [trainer.put_batch(b) for b in step_batches[: spec["warmup"] +
                                                                 spec["steps"]]]
    step, compile_s = compile_ahead(trainer, state, frozen, device_batches[0])
    calls = iter(device_batches * (1 + (spec["warmup"] + spec["steps"]) // len(device_batches)))

    def run_step():
        nonlocal state
        state, metrics = step(state, frozen, next(calls))
        return float(metrics["loss"])

    timing = timed_steps(run_step, spec["warmup"], spec["steps"])
    # Examples times epochs the steps cover (fewer than all epochs when train.max_steps cuts).
    example_epochs = stats.examples * total_steps / num_batches(len(rows), batch_size)
    return {**timing, "compile_s": compile_s, "examples": stats.examples, "epochs": epochs,
            "rows": len(rows), "example_epochs": example_epochs,
            "batch_size": batch_size, "seq_len": seq_len, "total_steps": total_steps,
            "logit_positions_per_step": logit_positions,
            "tokens_computed": total_steps * batch_size * seq_len,
            "real_tokens_per_epoch": stats.real_tokens,
            "padding_efficiency": stats.efficiency,
            "estimated_s": timing["step_s"] * total_steps,
            "jax": jax.__version__}


def decode_timings(generate, new_tokens: int, runs: int) -> dict:
    """Times generate(n) (which returns the new tokens per prompt) for n = new_tokens and n = 1
    (the prompt's forward pass plus one token), alternating, after one untimed call of each:
    decode time = t(n) - t(1), without the prefill."""
    tokens = generate(new_tokens)
    generate(1)
    full, prefill = [], []
    for _ in range(runs):
        for n, times in ((new_tokens, full), (1, prefill)):
            start = time.perf_counter()
            generate(n)
            times.append(time.perf_counter() - start)
    step_s, prefill_s = statistics.median(full), statistics.median(prefill)
    return {"step_s": step_s, "step_times_s": full, "prefill_s": prefill_s,
            "decode_s": max(step_s - prefill_s, 1e-9), "tokens": tokens}


def worker_decode_ours(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig
    from kaggle_pipeline.model import Transformer

    config, params = load_params(Path(spec["work"]))
    dtype = resolve_dtype(spec["dtype"])
    variables = {"params": jax.device_put(jax.tree.map(jnp.asarray, params))}
    del params
    # No stop token fires (-1 is no token id), so every prompt gets exactly n new tokens.
    sampler = Sampler(Transformer(config, dtype=dtype), stop_ids=(-1,))
    start = time.perf_counter()
    sampler.generate(variables, spec["prompts"], SamplingConfig(max_new_tokens=1))
    first_call_s = time.perf_counter() - start

    def generate(n: int) -> list[list[int]]:
        return sampler.generate(variables, spec["prompts"], SamplingConfig(max_new_tokens=n))

    timing = decode_timings(generate, spec["new_tokens"], spec["runs"])
    return {**timing, "first_call_s": first_call_s, "dtype": str(dtype),
            "framework": f"kaggle_pipeline Sampler (jax {jax.__version__})",
            "peak_rss_mb": max_rss_mb()}


def worker_decode_hf(spec: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(spec["work"]) / "hf-float32", dtype=torch.float32).eval()
    prompts = spec["prompts"]
    width = max(len(p) for p in prompts)
    # Left padding, as generate wants for a batch of decoder-only prompts.
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1

    def generate(n: int) -> list[list[int]]:
        # No eos: every prompt gets exactly n new tokens, like ours.
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
            pad_token_id=0, bos_token_id=2)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=config)
        return out[:, width:].tolist()

    start = time.perf_counter()
    generate(1)
    first_call_s = time.perf_counter() - start
    timing = decode_timings(generate, spec["new_tokens"], spec["runs"])
    return {**timing, "first_call_s": first_call_s, "dtype": "float32",
            "framework": f"transformers {transformers.__version__} generate "
                         f"(torch {torch.__version__})",
            "attention": model.config._attn_implementation, "peak_rss_mb": max_rss_mb()}


def worker_load(spec: dict) -> dict:
    """Peak RSS of load_checkpoint over the import baseline, in a fresh process."""
    import gc

    import jax
    import jax.numpy as jnp

    import kaggle_pipeline  # noqa: F401  (sets the XLA flag)
    import kaggle_pipeline.checkpoints.orbax_format  # noqa: F401  (imports are baseline)
    from kaggle_pipeline.checkpoints import load_checkpoint

    jnp.zeros(1).block_until_ready()  # the CPU client belongs to the baseline too
    gc.collect()
    baseline = rss_mb()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    _, params = load_checkpoint(spec["path"])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM") if reset_ok else max_rss_mb()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    size = sum(p.stat().st_size for p in Path(spec["path"]).rglob("*") if p.is_file()) \
        if Path(spec["path"]).is_dir() else Path(spec["path"]).stat().st_size
    return {"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "rss_after_mb": rss_mb(), "param_bytes": param_bytes, "file_bytes": size,
            "peak_over_params": (peak - baseline) * 2**20 / param_bytes,
            "peak_source": "VmHWM after reset" if reset_ok else "ru_maxrss"}


WORKERS = {"prep": worker_prep, "peak": worker_peak, "train-ours": worker_train_ours,
           "train-hf": worker_train_hf, "keras": worker_keras, "decode-ours": worker_decode_ours,
           "decode-hf": worker_decode_hf, "load": worker_load}


def run_as_worker(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[name](spec)
    result.setdefault("peak_rss_mb", max_rss_mb())
    atomic_write_text(Path(spec["result"]), json.dumps(result))


# ------------------------------------------------------------------------------ the parent


class Runner:
    """Starts workers, each in a fresh process, and collects their JSON results."""

    def __init__(self, work: Path, threads: int, preload: str | None = None):
        self.work = work
        self.spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
        self.threads = threads
        self.preload = preload  # the allocator every worker runs with (None: glibc's malloc)
        self.count = 0

    def env(self, xla_flags: str | None = None, reference: bool = False) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD")}
        if self.preload:
            env["LD_PRELOAD"] = self.preload
        if reference:
            env.pop("PYTHONPATH", None)
            env.pop("PYTHONHOME", None)
        else:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(PROJECT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if xla_flags is not None:
            env["XLA_FLAGS"] = xla_flags
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(self.threads))
        return env

    def run(self, name: str, spec: dict, *, xla_flags: str | None = None,
            reference: bool = False, timeout: float = 3600) -> dict:
        self.count += 1
        spec = {**spec, "result": str(self.spool / f"{self.count}-{name}.json"),
                "work": str(self.work), "threads": self.threads}
        spec_path = self.spool / f"{self.count}-{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        if reference:
            command = [str(REFERENCE_VENV / "bin" / "python"),
                       str(PROJECT / "scripts" / "bench_gemma_ref.py"), str(spec_path)]
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                       str(spec_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, env=self.env(xla_flags, reference), timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"{name}: timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            log(f"worker {name} failed ({proc.returncode}):\n{tail}")
            return {"error": f"{name} exited with {proc.returncode}: {tail.splitlines()[-1]}"
                    if tail else f"{name} exited with {proc.returncode}"}
        result = json.loads(Path(spec["result"]).read_text())
        result["process_wall_s"] = wall
        return result

    def cleanup(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)


def prepare(runner: Runner, gguf: Path, parts: list[str], load_formats: tuple[str, ...]) -> dict:
    """Writes the exports the parts need once; later runs reuse them."""
    work = runner.work
    stat = gguf.stat()
    stamp = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{PREP_VERSION}"
    meta_path = work / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("stamp") != stamp:
        log(f"{work} holds exports of another model file; rewriting them")
        for item in ["meta.json", "params.npz", *LOAD_FORMATS]:
            target = work / item
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    exports = []
    if set(parts) & {"train", "decode"}:
        exports.append("hf-float32")
    if "load" in parts:
        exports += [f for f in load_formats if f != "gguf" and f not in exports]
    missing = [e for e in exports if not (work / e).exists()]
    if missing or not meta_path.exists() or not (work / "params.npz").exists():
        log(f"exporting the GGUF's params to {work} (once): {', '.join(missing) or 'npz'}")
        result = runner.run("prep", {"gguf": str(gguf), "stamp": stamp, "exports": missing})
        if "error" in result:
            raise SystemExit(f"error: preparing the exports failed: {result['error']}")
    return json.loads(meta_path.read_text())


def flops_per_step(config: dict, batch: int, seq_len: int, lora_params: int,
                   logit_positions: int) -> float:
    """FLOPs of one LoRA train step (frozen base, so no weight gradients for it):

      per token:  2·N (forward) + 2·N (gradients w.r.t. activations), N = non-embedding matmul
                  params; 6·N_lora (LoRA forward, activation and weight gradients);
                  attention 3 · 4·heads·head_dim·c per layer (QKᵀ and AV forward, twice that
                  backward), c = keys a query attends to on average (causal, sliding window)
      per logit position: 4·D·V (unembedding forward + gradient w.r.t. the hidden state)
    """
    d, f = config["embed_dim"], config["hidden_dim"]
    n, k, h = config["num_heads"], config["num_kv_heads"], config["head_dim"]
    layers = config["attention_kinds"]
    matmul_params = len(layers) * (2 * n * d * h + 2 * k * d * h + 3 * d * f)
    attention = 0.0
    for kind in layers:
        span = seq_len if kind == "global" else min(seq_len, config["sliding_window"])
        keys = np.minimum(np.arange(1, seq_len + 1), span).mean()
        attention += 3 * 4 * n * h * keys
    per_token = 4 * matmul_params + 6 * lora_params + attention
    return batch * seq_len * per_token + 4 * d * config["vocab_size"] * logit_positions


def lora_param_count(config: dict, rank: int) -> int:
    d, n, k, h = (config["embed_dim"], config["num_heads"], config["num_kv_heads"],
                  config["head_dim"])
    per_layer = (d * rank + rank * n * h) * 2 + (d * rank + rank * k * h) * 2
    return len(config["attention_kinds"]) * per_layer


def part_train(runner: Runner, meta: dict, s: Settings, variants: list[str],
               results: dict) -> None:
    rng = np.random.default_rng(0)
    config = meta["config"]
    tokens = rng.integers(1000, config["vocab_size"], (s.batch, s.seq_len), dtype=np.int32)
    targets = np.zeros((s.batch, s.seq_len), bool)
    targets[:, -s.targets:] = True
    batch_path = runner.spool / "train_batch.npz"
    with open(batch_path, "wb") as f:
        np.savez(f, tokens=tokens, targets=targets)

    peaks = results.get("peak") or part_peak(runner, s, results)

    common = {"batch": str(batch_path), "rank": 8, "alpha": 16.0, "targets": s.targets,
              "warmup": s.warmup, "steps": s.steps}
    lora_params = lora_param_count(config, 8)
    model_flops = flops_per_step(config, s.batch, s.seq_len, lora_params, s.batch * s.targets)
    ours_logits = s.batch * s.targets
    logits_at = {"ours-f32": ours_logits, "ours-bf16": ours_logits, "ours-auto": ours_logits,
                 "ours-ynn": ours_logits, "hf": s.batch * s.seq_len,
                 "hf-keep": s.batch * (s.targets + 1), "hf-amp": s.batch * (s.targets + 1)}
    out = {"batch": s.batch, "seq_len": s.seq_len, "loss_positions_per_row": s.targets,
           "model_flops_per_step": model_flops,
           "flops_formula": flops_per_step.__doc__.strip(), "variants": {}}
    for variant in variants:
        log(f"train step: {variant}")
        if variant.startswith("ours"):
            flags = YNN_FLAG if variant == "ours-ynn" else None
            precision = variant.removeprefix("ours-") if variant != "ours-ynn" else "f32"
            r = runner.run("train-ours", {**common, "dtype": precision}, xla_flags=flags)
        elif variant.startswith("hf"):
            r = runner.run("train-hf", {**common, "variant": {
                "hf": "full", "hf-keep": "keep", "hf-amp": "amp"}[variant]})
        else:
            if not (REFERENCE_VENV / "bin" / "python").exists():
                r = {"error": f"no reference env {REFERENCE_VENV}: run "
                              "bash scripts/setup_reference_env.sh"}
            else:
                r = runner.run("gemma", {
                    **common, "params": str(runner.work / "params.npz"),
                    "learning_rate": LEARNING_RATE, "clip_norm": CLIP_NORM,
                    "lora": "all" if variant == "gemma-all" else "attention"},
                    reference=True, xla_flags=YNN_FLAG if variant == "gemma-ynn" else None)
        if "error" not in r:
            r.pop("values", None)
            tokens_per_s = s.batch * s.seq_len / r["step_s"]
            executed = flops_per_step(config, s.batch, s.seq_len, lora_params,
                                      logits_at.get(variant, s.batch * s.seq_len))
            r.update(tokens_per_s=tokens_per_s, model_gflops=model_flops / r["step_s"] / 1e9,
                     executed_gflops=executed / r["step_s"] / 1e9,
                     logit_positions_per_step=logits_at.get(variant, s.batch * s.seq_len))
            # MFU against the peak of the precision the variant's matmuls run in.
            precision = "bf16" if variant in ("ours-bf16", "hf-amp") or (
                variant == "ours-auto" and "bfloat16" in r.get("dtype", "")) else "f32"
            best = peaks["best_gflops"].get(precision)
            if best:
                r.update(mfu=model_flops / r["step_s"] / 1e9 / best,
                         hfu=executed / r["step_s"] / 1e9 / best, mfu_peak=precision)
        out["variants"][variant] = r
    results["train"] = out


def part_peak(runner: Runner, s: Settings, results: dict) -> dict:
    """Matmul peaks of numpy, torch and jax in f32 and in bf16 (f32 accumulation)."""
    out: dict = {"best_gflops": {}}
    flags = results["machine"].get("cpu_flags", {})  # read once, in main
    bf16_hardware = flags.get("amx_bf16") or flags.get("avx512_bf16")
    for precision in ("f32", "bf16"):
        libraries = {}
        for lib in ("numpy", "torch", "jax"):
            if precision == "bf16" and lib == "torch" and not bf16_hardware:
                # torch's CPU bf16 matmul without AMX or AVX-512 bf16 falls back to a scalar
                # loop: over 5 minutes for one 2048^3 product on an AVX2 machine.
                libraries[lib] = {"dtype": precision,
                                  "skipped": "no amx_bf16 or avx512_bf16 on this CPU"}
                continue
            log(f"peak {precision} matmul rate: {lib}")
            libraries[lib] = runner.run("peak", {"lib": lib, "dtype": precision,
                                                 "sizes": list(s.matmul_sizes),
                                                 "reps": s.matmul_reps})
        out[precision] = libraries
        out["best_gflops"][precision] = max(
            (r["best_gflops"] for r in libraries.values() if "best_gflops" in r), default=None)
    results["peak"] = out
    return out


def part_keras(runner: Runner, meta: dict, s: Settings, overrides: list[str], full_job: bool,
               gguf: Path, results: dict) -> None:
    out = {}
    for mode in ("padded", "packed"):
        log(f"review job: {mode}")
        out[mode] = runner.run("keras", {"mode": mode, "overrides": overrides,
                                         "gguf": str(gguf), "warmup": s.keras_warmup,
                                         "steps": s.keras_steps})
        out[mode].pop("values", None)
    if full_job:
        log("review job: the whole default train phase (kaggle_pipeline.train, predict off)")
        run_dir = runner.work / "full-job"
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "kaggle_pipeline.train", "train.predict=false",
                   f"output.dir={run_dir}", "output.name=bench",
                   f"output.submissions={run_dir / 'submissions'}", *overrides]
        start = time.perf_counter()
        proc = subprocess.run(command, env=runner.env(), cwd=PROJECT, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            out["full_job"] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            summary = json.loads((run_dir / "bench" / "summary.json").read_text())
            out["full_job"] = {"wall_s": wall, "summary": summary}
    results["keras"] = out


def part_decode(runner: Runner, meta: dict, s: Settings, impls: list[str],
                results: dict) -> None:
    """Greedy decoding at each batch size: every implementation on the same prompts (the
    review prompts, repeated to fill the batch), one after the other per batch size. `hf` and
    `ours-f32` must produce identical tokens: `decode.identical_tokens.<batch>` says whether they
    did, and the script exits with 1 when they did not."""
    out: dict = {"new_tokens": s.new_tokens, "batches": list(s.decode_batches),
                 "identical_tokens": {}, "prompt_lengths": {}}
    for batch in s.decode_batches:
        prompts = (meta["prompts"] * (1 + batch // len(meta["prompts"])))[:batch]
        out["prompt_lengths"][str(batch)] = [len(p) for p in prompts]
        for impl in impls:
            log(f"decode: {impl} at batch {batch}")
            spec = {"prompts": prompts, "new_tokens": s.new_tokens, "runs": s.decode_runs}
            if impl == "hf":
                r = runner.run("decode-hf", spec)
            else:
                r = runner.run("decode-ours", {**spec, "dtype": impl.removeprefix("ours-")})
            if "error" not in r:
                r["tokens_per_s"] = batch * s.new_tokens / r["step_s"]
                r["decode_tokens_per_s"] = batch * (s.new_tokens - 1) / r["decode_s"]
                r["prefill_tokens_per_s"] = sum(map(len, prompts)) / r["prefill_s"]
            out.setdefault(impl, {})[str(batch)] = r
        ours = out.get("ours-f32", {}).get(str(batch), {})
        hf = out.get("hf", {}).get(str(batch), {})
        if "tokens" in ours and "tokens" in hf:
            out["identical_tokens"][str(batch)] = ours["tokens"] == hf["tokens"]
    results["decode"] = out


def part_load(runner: Runner, gguf: Path, formats: tuple[str, ...], results: dict) -> None:
    out = {}
    for fmt in formats:
        log(f"load: {fmt}")
        path = gguf if fmt == "gguf" else runner.work / fmt
        out[fmt] = runner.run("load", {"path": str(path)})
    results["load"] = out


# ------------------------------------------------------------------------------ the report


def _f(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def report(results: dict) -> str:
    machine = results.get("machine", {})
    flags = machine.get("cpu_flags", {})
    lines = [f"CPU: {machine.get('cpu', '?')}, {machine.get('cpus')} cores; "
             + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
             + f"; AMX: {'yes' if machine.get('amx') else 'no'}",
             f"host allocator of every worker: {machine.get('allocator', '?')}", ""]
    peak = results.get("peak")
    if peak:
        for precision in ("f32", "bf16"):
            libs = ", ".join(
                f"{lib} {_f(r.get('best_gflops'))}" if "best_gflops" in r else
                f"{lib} {r.get('skipped') or 'failed'}" for lib, r in peak[precision].items())
            lines.append(f"Peak {precision} matmul GFLOP/s (best of sizes"
                         f"{', f32 accumulation' if precision == 'bf16' else ''}): {libs}")
        lines += ["MFU of each variant against the best peak of its precision", ""]
    train = results.get("train")
    if train:
        lines.append(f"1. LoRA train step, Gemma 3 270M f32, batch {train['batch']} x "
                     f"{train['seq_len']} tokens, loss on the last "
                     f"{train['loss_positions_per_row']} of each row "
                     f"({train['model_flops_per_step'] / 1e9:.1f} model GFLOP/step)")
        ours = train["variants"].get("ours-f32", {}).get("step_s")
        rows = []
        for name, r in train["variants"].items():
            if "error" in r:
                rows.append([name, "error: " + r["error"][:60], *[""] * 9])
                continue
            rows.append([name, _f(r["step_s"], ".3f"), _f(r["tokens_per_s"], ".0f"),
                         _f(r.get("mfu"), ".1%"), _f(r.get("hfu"), ".1%"),
                         _f(r["first_loss"], ".4f"), _f(r.get("compile_s"), ".1f"),
                         _f(r["first_step_s"], ".1f"),
                         _f(r.get("train_peak_rss_mb"), ".0f"), _f(r["peak_rss_mb"], ".0f"),
                         _f(r["step_s"] / ours if ours else None, ".2f") + "x"])
        lines.append(table(["variant", "step s", "tok/s", "MFU", "HFU", "loss@1", "compile s",
                            "1st step s", "train RSS MB", "peak RSS MB", "time/ours-f32"],
                           rows))
        first = [r["first_loss"] for r in train["variants"].values() if "first_loss" in r]
        if len(first) > 1:
            spread = (max(first) - min(first)) / abs(min(first))
            lines.append(f"   loss of step 1 (same weights, same batch, LoRA B = 0) agrees to "
                         f"{spread:.1e} relative" + ("" if spread < 1e-4 else
                                                      "  <-- NOT the same computation?"))
        lines.append("   MFU: model FLOPs (unembedding only at loss positions) / peak; HFU: the "
                     "FLOPs each one executes (HF and gemma unembed every position).")
        lines.append("")
    keras = results.get("keras")
    if keras:
        lines.append("2. The review job: Keras-tutorial recipe (pad to 512, batch 1, 5 epochs, "
                     "logits everywhere) vs ours (packing, logits at loss positions)")
        rows = []
        for name, label in (("padded", "keras recipe"), ("packed", "ours (default job)")):
            r = keras.get(name, {})
            if "error" in r:
                rows.append([label, "error: " + r["error"][:60], *[""] * 6])
                continue
            rows.append([label, f"{r['examples']} x {r['epochs']}",
                         f"{r['total_steps']} x {r['batch_size']}x{r['seq_len']}",
                         f"{r['tokens_computed']:,}", _f(r["padding_efficiency"], ".0%"),
                         _f(r["step_s"], ".3f"), _f(r["estimated_s"], ".0f")])
        lines.append(table(["recipe", "examples x epochs", "steps x rows x len",
                            "tokens computed", "real/computed", "step s", "est. train s"],
                           rows))
        p, q = keras.get("padded", {}), keras.get("packed", {})
        if "estimated_s" in p and "estimated_s" in q:
            per_p = p["estimated_s"] / p["example_epochs"]
            per_q = q["estimated_s"] / q["example_epochs"]
            ratio = p["estimated_s"] / q["estimated_s"]
            lines.append(f"   estimated from {len(p['step_times_s'])} timed steps each "
                         f"(compilation excluded): keras/ours wall {ratio:.1f}x, "
                         f"tokens computed {p['tokens_computed'] / q['tokens_computed']:.1f}x; "
                         f"per example-epoch {per_p:.3f} s vs {per_q:.3f} s "
                         f"({per_p / per_q:.1f}x)")
        fj = keras.get("full_job")
        if fj:
            lines.append(f"   full default train phase (run): {fj}" if "error" in fj else
                         f"   full default train phase (run): wall {fj['wall_s']:.0f} s, "
                         f"{fj['summary'].get('steps')} steps, train_seconds "
                         f"{fj['summary'].get('train_seconds')} (load, compile and "
                         "checkpoints included)")
        lines.append("")
    decode = results.get("decode")
    if decode:
        lines.append(f"3. Greedy decoding, {decode['new_tokens']} new tokens per prompt, no stop "
                     "token; decode tok/s leaves the prefill out (t(n) - t(1))")
        rows = []
        impls = [k for k in decode if k.startswith("ours") or k == "hf"]
        for batch in decode["batches"]:
            hf = decode.get("hf", {}).get(str(batch), {})
            for impl in impls:
                r = decode[impl].get(str(batch))
                if not r:
                    continue
                if "error" in r:
                    rows.append([str(batch), impl, "error: " + r["error"][:60], "", "", "", ""])
                    continue
                ratio = (r["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
                         if "decode_tokens_per_s" in hf else None)
                rows.append([str(batch), impl, _f(r["decode_tokens_per_s"], ".1f"),
                             _f(r["tokens_per_s"], ".1f"), _f(r["prefill_s"], ".2f"),
                             _f(r["first_call_s"], ".1f"), _f(ratio, ".2f") + "x"])
        lines.append(table(["batch", "impl", "decode tok/s", "tok/s with prefill", "prefill s",
                            "1st call s", "decode vs hf"], rows))
        same = decode.get("identical_tokens", {})
        lines.append(f"   identical greedy tokens, ours-f32 vs hf, per batch: {same}"
                     + ("" if all(same.values()) else "  <-- NOT IDENTICAL"))
        lines.append("")
    load = results.get("load")
    if load:
        lines.append("4. Peak RSS while loading (fresh process, over the RSS after imports) / "
                     "bytes of the loaded f32 params; goal <= 1.5x")
        rows = []
        for fmt, r in load.items():
            if "error" in r:
                rows.append([fmt, "error: " + r["error"][:60], "", "", "", ""])
                continue
            rows.append([fmt, f"{r['file_bytes'] / 2**20:.0f}", f"{r['param_bytes'] / 2**20:.0f}",
                         f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}",
                         f"{r['peak_over_params']:.2f}x", f"{r['seconds']:.1f}"])
        lines.append(table(["format", "file MB", "params MB", "peak - baseline MB",
                            "ratio", "load s"], rows))
    return "\n".join(lines)


def machine_info() -> dict:
    info: dict = {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version()}
    try:
        present: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not present:
                present = set(line.split(":", 1)[1].split())
        info["cpu_flags"] = {flag: flag in present for flag in CPU_FLAGS}
        info["amx"] = "amx_bf16" in present and "amx_tile" in present
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--out", required=True, help="where to write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="small batch, few steps: checks the script, not the machine")
    parser.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS),
                        help=f"from {', '.join(TRAIN_VARIANTS + EXTRA_TRAIN_VARIANTS)} "
                             "(ours-ynn, gemma-ynn: with XLA's YNNPACK fusions; "
                             "gemma-all: plain gm.nn.LoRA on every einsum)")
    parser.add_argument("--decode-impls", default=",".join(DECODE_IMPLS),
                        help="decode part: from hf, ours-f32, ours-bf16, ours-auto")
    parser.add_argument("--decode-batches", default=None,
                        help="decode part: comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--full-job", action="store_true",
                        help="keras part: also run the whole default train phase")
    parser.add_argument("--job-override", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="changes the default job (keras part)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) /
                                                  "kaggle_pipeline_bench"),
                        help="cache of the exported weights (~4.5 GB with the load part)")
    parser.add_argument("--malloc", choices=("auto", "system"), default="auto",
                        help="the host allocator of every worker, whatever the framework: auto = "
                             "what the pipeline's commands use (tcmalloc if installed, see "
                             "kaggle_pipeline/host_malloc.py), system = glibc's malloc")
    for field in dataclasses.fields(Settings):
        if field.type in ("int", int):
            parser.add_argument("--" + field.name.replace("_", "-"), type=int,
                                help=f"default {field.default} ({QUICK.__dict__[field.name]} "
                                     "with --quick)")
    args = parser.parse_args(argv)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    variants = [v.strip() for v in args.train_variants.split(",") if v.strip()]
    unknown = set(variants) - set(TRAIN_VARIANTS + EXTRA_TRAIN_VARIANTS)
    if unknown:
        parser.error(f"unknown train variant(s) {sorted(unknown)}")
    settings = QUICK if args.quick else Settings()
    settings = dataclasses.replace(settings, **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None})
    if args.decode_batches:
        settings = dataclasses.replace(settings, decode_batches=tuple(
            int(b) for b in args.decode_batches.split(",") if b.strip()))
    impls = [i.strip() for i in args.decode_impls.split(",") if i.strip()]
    unknown = set(impls) - {"hf", "ours-f32", "ours-bf16", "ours-auto"}
    if unknown:
        parser.error(f"unknown decode impl(s) {sorted(unknown)}")
    if not 0 < settings.targets < settings.seq_len:
        parser.error("--targets must be between 1 and --seq-len - 1")

    sys.path.insert(0, str(PROJECT))
    from kaggle_pipeline import host_malloc
    from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    preload = host_malloc.wanted_library() if args.malloc == "auto" else None
    runner = Runner(work, settings.threads, preload)
    started = time.perf_counter()
    machine = {**machine_info(), "allocator": preload or "glibc malloc"}
    results: dict = {"machine": machine, "settings": dataclasses.asdict(settings),
                     "quick": args.quick, "parts": parts, "gguf": str(gguf)}
    try:
        meta = prepare(runner, gguf, parts, settings.load_formats)
        if "peak" in parts:
            part_peak(runner, settings, results)
        if "train" in parts:
            part_train(runner, meta, settings, variants, results)
        if "keras" in parts:
            part_keras(runner, meta, settings, args.job_override, args.full_job, gguf, results)
        if "decode" in parts:
            part_decode(runner, meta, settings, impls, results)
        if "load" in parts:
            part_load(runner, gguf, settings.load_formats, results)
    finally:
        runner.cleanup()
        results["seconds"] = time.perf_counter() - started
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1))
    print(report(results))
    print(f"\n{'quick check, not a measurement; ' if args.quick else ''}"
          f"{results['seconds']:.0f} s; results in {args.out}")
    same = results.get("decode", {}).get("identical_tokens", {})
    if not all(same.values()):
        print("error: ours-f32 and transformers generate gave different greedy tokens",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(PROJECT))
        run_as_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
