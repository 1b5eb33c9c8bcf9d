#!/usr/bin/env bash
# On whatever accelerator jax sees (a Kaggle TPU v3-8, a GPU): the parity tests, the bf16 train
# step (tokens/s, MFU against the device's bf16 peak), decoding throughput, and `plan`'s
# memory estimate for the same 2B step beside the memory it really used. One table at the end.
# Unattended, each part under its own time limit, under 8 minutes in all.
#
#   bash scripts/device_check.sh            # from the checkout, with .venv installed
#   PYTHON=python3 bash scripts/device_check.sh
#   PRESET=tiny-gemma2 SEQ=64 PARITY= bash scripts/device_check.sh   # a smoke run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
PRESET="${PRESET:-gemma2-2b}"
SEQ="${SEQ:-1024}"
PARITY="${PARITY-tests/test_layer_scan.py tests/test_chunked_attention.py tests/test_precision.py tests/test_gguf_parity.py tests/test_model.py}"
OUT="$(mktemp -d)"
echo "device_check: results in $OUT"

"$PYTHON" -c "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind} ({d[0].platform})')" \
  | tee "$OUT/devices.txt"

# 1. Parity (model against the references, scan against unrolled, chunked against dense,
#    bf16 against f32). f32 tests compare to 1e-5: on TPU, f32 matmuls must not run as one
#    bf16 pass, so the highest matmul precision is asked for.
if [ -n "$PARITY" ]; then
  # shellcheck disable=SC2086
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider \
    $PARITY > "$OUT/parity.txt" 2>&1
  echo "parity exit $?" >> "$OUT/parity.txt"
else
  printf 'skipped\nnot run (PARITY empty)\n' > "$OUT/parity.txt"
fi
tail -n 3 "$OUT/parity.txt"

# 2-3. The bf16 train step of a Gemma 2 2B (random weights) over all devices, then decoding.
timeout 200 "$PYTHON" scripts/device_bench.py --preset "$PRESET" --batch 8 --seq "$SEQ" \
  --steps 5 --decode-batch 8 --new-tokens 64 > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "bench exit $?"

# 4. What plan says the same step needs on these devices.
N="$("$PYTHON" -c 'import jax; print(jax.device_count())')"
timeout 150 "$PYTHON" -m kaggle_pipeline.plan --json --target local --programs train \
  model.checkpoint= model.preset="$PRESET" model.dtype=bfloat16 model.param_dtype=bfloat16 \
  model.scan_layers=true train.mesh_data=1 train.mesh_fsdp="$N" data.batch_size=8 \
  data.seq_len="$SEQ" data.loss_on=answer > "$OUT/plan.json" 2> "$OUT/plan.err"
echo "plan exit $?"

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads(out.joinpath(name).read_text().strip().splitlines()[-1])
    except Exception as err:  # a part that failed or timed out
        return {"error": f"{name}: {err}"}
bench, plan = load("bench.json"), load("plan.json")
parity = out.joinpath("parity.txt").read_text().strip().splitlines()
rows = [("devices", out.joinpath("devices.txt").read_text().strip()),
        ("parity tests", parity[-2] if len(parity) > 1 else "did not run")]
if "error" not in bench:
    mfu = "n/a (no bf16 peak known)" if bench["mfu"] is None else f"{100 * bench['mfu']:.1f}%"
    rows += [(f"train step ({bench['preset']}, LoRA, bf16, {bench['batch']} x {bench['seq']})",
              f"{bench['step_s']} s, "
              f"{bench['tokens_per_s']:.0f} tokens/s, MFU {mfu}, compile {bench['compile_s']} s"),
             ("decode (batch 8, 64 new tokens)", f"{bench['decode_tokens_per_s']:.0f} tokens/s"),
             ("train peak memory per device (measured)",
              "n/a" if bench["train_peak_bytes_per_device"] is None
              else f"{bench['train_peak_bytes_per_device'] / 1e9:.2f} GB")]
else:
    rows.append(("bench", bench["error"] + " (see bench.err)"))
if "error" not in plan:
    p = plan["programs"]["train"]
    rows.append(("train peak memory per device (plan)",
                 f"{p['peak_bytes_per_device'] / 1e9:.2f} GB, compile {p['compile_seconds']} s"))
else:
    rows.append(("plan", plan["error"] + " (see plan.err)"))
print("\n| check | result |\n|---|---|")
for name, value in rows:
    print(f"| {name} | {value} |")
EOF
