"""The train step and decoding on whatever accelerator jax sees, in bf16: tokens/s, MFU against
the device's bf16 peak, and the memory the step really used (to set beside `plan`'s estimate).
Random weights of a preset (no download), all devices on the fsdp axis. Prints one JSON object.

    python scripts/device_bench.py --preset gemma2-2b --batch 8 --seq 1024 --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kaggle_pipeline import plan, run_setup
from kaggle_pipeline.inference.sampler import Sampler, SamplingConfig
from kaggle_pipeline.model.lora import init_lora
from kaggle_pipeline.model.loss import add_target_slots
from kaggle_pipeline.run_config import load_config
from kaggle_pipeline.training.optimizer import make_optimizer
from kaggle_pipeline.training.step import Trainer

# Dense bf16 peak FLOP/s per jax device, by device_kind (a TPU v3 device is one of a chip's two
# cores; v4 and v5p devices are whole chips).
BF16_PEAK = {"TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
             "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12,
             "NVIDIA L4": 121e12, "Tesla T4": 65e12, "Tesla P100-PCIE-16GB": 18.7e12}


def peak_memory() -> int | None:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use")]
    return max(peaks) if peaks else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value")
    args = parser.parse_args()
    n = jax.device_count()
    cfg = load_config(None, ["model.checkpoint=", f"model.preset={args.preset}",
                             "model.dtype=bfloat16", "model.param_dtype=bfloat16",
                             "model.scan_layers=true", "lora.last_layers=0", "train.mesh_data=1",
                             f"train.mesh_fsdp={n}", f"data.batch_size={args.batch}",
                             f"data.seq_len={args.seq}", "data.loss_on=answer",
                             *args.overrides])
    mesh = run_setup.build_mesh(cfg)
    config, params = run_setup.load_model(cfg.model, mesh=mesh)
    model = run_setup.transformer(cfg.model, config, mesh, lora_scale=cfg.lora.scale,
                                  deterministic=False)
    trainer = Trainer(model, make_optimizer(cfg.optim, 100), mesh, "lora")
    lora = run_setup.place_lora(init_lora(config, cfg.lora, jax.random.key(0)), cfg.lora, config,
                                cfg.model)
    state = trainer.init_state(lora)
    step = trainer.compile_step(state, params)

    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    host = {"tokens": rng.integers(1, config.vocab_size, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32), "targets": np.ones((b, t), bool)}
    host["targets"][:, 0] = False
    batch = trainer.put_batch(add_target_slots(host, t))
    start = time.perf_counter()
    state, metrics = step(state, params, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, params, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens_per_s = b * t / step_s
    flops_per_token = plan.model_flops_per_token(config, t, 1.0, 2)
    kind = jax.devices()[0].device_kind
    peak = BF16_PEAK.get(kind)
    train_peak_bytes = peak_memory()

    sampler = Sampler(model, stop_ids=(-1,))  # random weights: never stops, full length
    variables = {"params": params, "lora": state["trainable"]}
    prompts = [list(rng.integers(1, config.vocab_size, 64)) for _ in range(args.decode_batch)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    sampler.generate(variables, prompts, sampling)  # compile
    start = time.perf_counter()
    sampler.generate(variables, prompts, sampling)
    decode_s = time.perf_counter() - start

    print(json.dumps({
        "device_kind": kind, "devices": n, "preset": args.preset, "batch": b, "seq": t,
        "loss": float(metrics["loss"]), "compile_s": round(compile_s, 1),
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None if peak is None else round(flops_per_token * tokens_per_s / (n * peak), 4),
        "bf16_peak_flops_per_device": peak, "train_peak_bytes_per_device": train_peak_bytes,
        "decode_batch": args.decode_batch, "decode_tokens_per_s":
            round(args.decode_batch * args.new_tokens / decode_s, 1),
        "dtype": jnp.dtype(model.dtype).name}))


if __name__ == "__main__":
    main()
