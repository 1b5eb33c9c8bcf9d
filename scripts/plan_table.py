"""The plan table of BENCHMARKS.md: `python -m kaggle_pipeline.plan --json` for Gemma 2 2B, 9B
and 27B on TPU targets, one subprocess per row, run one after the other (each compile takes one
core for minutes), every result appended to a JSON-lines file as it completes.

    nice -n 10 python scripts/plan_table.py run --out plan_rows.jsonl [--only 9b-lora-1024]
    python scripts/plan_table.py table plan_rows.jsonl        # the Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The runs of a kernel on a TPU slice: LoRA r8 on q, k, v, o, bf16 ("auto" on TPU), all cores
# on the fsdp axis, batch 8 rows.
BASE = ["model.checkpoint=", "model.dtype=auto", "model.param_dtype=auto", "train.mesh_data=1",
        "train.mesh_fsdp=8", "train.mesh_model=1", "data.batch_size=8", "data.loss_on=answer"]


def row(name, preset, seq, *, target="v3-8", scan=True, remat=False, full=False,
        programs="train", extra=()):
    settings = [f"model.preset={preset}", f"data.seq_len={seq}",
                f"model.scan_layers={str(scan).lower()}", f"model.remat={str(remat).lower()}",
                f"lora.enabled={str(not full).lower()}", *extra]
    return {"name": name, "target": target, "programs": programs, "settings": settings}


def kernel(name, folder, programs="train,score"):
    """A kernel's own config, planned as it ships (placeholders left unfilled: the preset
    says which model, nothing is read)."""
    return {"name": name, "target": "v3-8", "programs": programs, "settings": [],
            "config": f"kernels/{folder}/config.toml"}


# In the order they run: the goals first, then the sweep.
ROWS = [
    row("9b-lora-1024-remat", "gemma2-9b", 1024, remat=True),
    kernel("kernel-tarr-sentiment-9b", "tarr-sentiment-9b"),
    row("27b-lora-1024-remat", "gemma2-27b", 1024, remat=True),
    # Compile time with and without the scan, back to back.
    row("2b-lora-1024", "gemma2-2b", 1024),
    row("2b-lora-1024-unrolled", "gemma2-2b", 1024, scan=False),
    row("9b-lora-1024-remat-unrolled", "gemma2-9b", 1024, remat=True, scan=False),
    row("9b-lora-1024-remat-again", "gemma2-9b", 1024, remat=True),
    row("2b-full-1024-remat", "gemma2-2b", 1024, remat=True, full=True),
    # 9B at a size the unrolled layers fit, so both compiles run to the end.
    row("9b-lora-512-remat-unrolled", "gemma2-9b", 512, remat=True, scan=False),
    row("9b-lora-512-remat", "gemma2-9b", 512, remat=True),
    row("v5e-9b-lora-1024-remat", "gemma2-9b", 1024, target="v5e-8", remat=True),
    row("2b-lora-4096-remat", "gemma2-2b", 4096, remat=True),
    row("9b-lora-4096-remat", "gemma2-9b", 4096, remat=True),
    row("2b-lora-512", "gemma2-2b", 512),
    row("2b-lora-2048", "gemma2-2b", 2048),
    row("2b-lora-4096", "gemma2-2b", 4096),
    row("9b-lora-2048-remat", "gemma2-9b", 2048, remat=True),
    row("9b-lora-1024", "gemma2-9b", 1024),
    row("2b-full-1024", "gemma2-2b", 1024, full=True),
    row("v5e-2b-lora-1024", "gemma2-2b", 1024, target="v5e-8"),
    row("v5e-27b-lora-1024-remat", "gemma2-27b", 1024, target="v5e-8", remat=True),
    row("v5e-2b-full-1024-remat", "gemma2-2b", 1024, target="v5e-8", remat=True, full=True),
    kernel("kernel-tarr-sentiment", "tarr-sentiment"),
    kernel("kernel-dolly-en-ko", "dolly-en-ko", "train,decode"),
    kernel("kernel-aihub-dialogue", "aihub-dialogue", "train,decode"),
    row("27b-lora-1024-remat-unrolled", "gemma2-27b", 1024, remat=True, scan=False),
]


def run(out: Path, only: set[str], timeout: float) -> None:
    done = set()
    if out.exists():
        done = {json.loads(line)["name"] for line in out.read_text().splitlines() if line}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for r in ROWS:
        if r["name"] in done or (only and r["name"] not in only):
            continue
        command = [sys.executable, "-m", "kaggle_pipeline.plan", "--json", "--target",
                   r["target"], "--programs", r["programs"]]
        if "config" in r:
            command += ["--config", r["config"]]
        else:
            command += [*BASE, *r["settings"]]
        start = time.time()
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {timeout:.0f} s"}
        record = {"name": r["name"], "wall_seconds": round(time.time() - start, 1),
                  "command": " ".join(command[1:]), **result}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{r['name']}: {record['wall_seconds']} s", flush=True)


def table(path: Path) -> str:
    lines = ["| row | target | model | mode | seq | scan | remat | program | peak GB/core | "
             "fits | GFLOP/token | compile s (CPU s) |", "|" + "---|" * 12]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | | | error: {r['error'][-120:]} |||||")
            continue
        m = r["model"]
        size = f"{m['params'] / 1e9:.1f}B"
        for prog, p in r["programs"].items():
            lines.append(
                f"| {r['name']} | {r['target']} | {size} | {'LoRA' if m['lora'] else 'full'} "
                f"| {m['seq_len']} | {'yes' if m['scan_layers'] else 'no'} | "
                f"{m['remat_policy'] if m['remat'] else 'no'} | {prog} | "
                f"{p['peak_bytes_per_device'] / 1e9:.2f} | {'yes' if p['fits'] else 'NO'} | "
                f"{p.get('flops_per_token', 0) / 1e9:.1f} | {p['compile_seconds']} "
                f"({p.get('compile_cpu_seconds', '-')}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, default=Path("plan_rows.jsonl"))
    r.add_argument("--only", default="", help="comma-separated row names")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    t = sub.add_parser("table")
    t.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, {n for n in args.only.split(",") if n}, args.timeout)
    else:
        print(table(args.path))


if __name__ == "__main__":
    main()
