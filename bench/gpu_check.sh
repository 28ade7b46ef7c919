#!/usr/bin/env bash
# GPU check for the trainer: ready to run on one H100/H200 in about 10 minutes or less.
#
#   bash bench/gpu_check.sh            # writes $OUT (default /tmp/kubetune-gpu-check)
#
# What it measures, on a ~0.6B random-weight Llama-shaped model (hidden 1536, 20 layers,
# FFN 4096, 12 heads / 4 KV heads, vocab 32000) in bf16, with the same synthetic data
# generator as the CPU benchmarks (longer examples: median 300 tokens):
#   1. kubetune (defaults: every GPU fast path that is installed) vs the plain HF baseline
#      (bench/trainer_throughput.py, 2 alternating pairs): non-pad tokens/s, held-out loss;
#   2. each fast path's share: kubetune alone with one path turned off at a time
#      (KUBETUNE_DISABLE_FAST_PATHS), then with all of them off;
#   3. QLoRA (4-bit NF4) vs LoRA peak GPU memory during training, same batch;
#   3b. kubetune plan's memory estimate vs the measured peak (max reserved + CUDA context)
#       for LoRA and QLoRA, with and without gradient checkpointing (docs/plan.md);
#   4. a summary: speed-up, MFU = 4·N·tokens/s / peak bf16 FLOP/s (N = all parameters;
#      4N FLOPs per token for LoRA: forward 2N, input gradients 2N, no weight gradients),
#      and the QLoRA/LoRA memory ratio. Targets (issue 12): ≥ 2.5× the baseline, MFU ≥ 40 %,
#      QLoRA ≤ 0.45× LoRA's peak memory.
# Nothing here has been run yet on a GPU: docs/benchmarks.md claims no GPU numbers.
# Needs the trainer's dependencies; flash-attn and liger-kernel are used when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/kubetune-gpu-check}
WORK="$OUT/work"
mkdir -p "$OUT"
export KUBETUNE_BENCH_SHAPE=${KUBETUNE_BENCH_SHAPE:-'{"hidden_size":1536,"intermediate_size":4096,"num_hidden_layers":20,"num_attention_heads":12,"num_key_value_heads":4,"vocab_size":32000}'}
export KUBETUNE_BENCH_MEDIAN_TOKENS=${KUBETUNE_BENCH_MEDIAN_TOKENS:-300}
export KUBETUNE_BENCH_MAX_TOKENS=${KUBETUNE_BENCH_MAX_TOKENS:-1500}
EXAMPLES=${EXAMPLES:-2400}
# Both sides: 8 examples per micro-batch for the baseline, 32 per optimizer step.
SHARED=(--shared-set training.batch_size=8 --shared-set training.gradient_accumulation_steps=4)

{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - <<'PY' | tee "$OUT/installed.txt"
from kubetune_trainer.fastpaths import choose, importable
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("flash_attn", importable("flash_attn"), "liger_kernel", importable("liger_kernel"))
print("chosen", choose(cuda=torch.cuda.is_available(), precision="bf16").names())
PY

echo "== 1. kubetune vs baseline (≤ 5 min)"
timeout 330 "$PY" bench/trainer_throughput.py --examples "$EXAMPLES" --reps 2 --keep "$WORK" \
  "${SHARED[@]}" | tee "$OUT/throughput.txt" || echo "throughput: failed or timed out ($?)"

worker() {  # worker NAME [args...]: one kubetune run on the prepared model and data
  local name=$1; shift
  if timeout 90 "$PY" bench/trainer_throughput.py --worker kubetune --workdir "$WORK" \
      "${SHARED[@]}" "$@" > "$OUT/$name.log" 2>&1; then
    cp "$WORK/kubetune.json" "$OUT/$name.json"
  else
    echo "$name: failed or timed out (see $OUT/$name.log)"
  fi
}

echo "== 2. each fast path's share (≤ 4 × 90 s)"
for off in flash_attention liger fused_adamw flash_attention,liger,fused_adamw; do
  KUBETUNE_DISABLE_FAST_PATHS=$off worker "off-${off//,/+}" --set training.max_steps=40
done

echo "== 3. QLoRA vs LoRA peak memory, same batch (≤ 2 × 90 s)"
worker mem-lora --set training.max_steps=10
worker mem-qlora --set training.max_steps=10 --set method.type=qlora

echo "== 3b. memory estimate vs measured peak (bench/memory_estimate.py; 0.6B bf16, LoRA/QLoRA)"
"$PY" bench/memory_estimate.py --device cuda --json "$OUT/memory_estimate.json" \
  | tee "$OUT/memory_estimate.txt" || echo "memory estimate check failed" | tee -a "$OUT/memory_estimate.txt"

echo "== 4. summary"
"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
shape = json.loads(os.environ["KUBETUNE_BENCH_SHAPE"])
h, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
head = h // shape["num_attention_heads"]
attn = 2 * h * h + 2 * h * head * shape["num_key_value_heads"]
n = layers * (attn + 3 * h * f) + v * h  # matmul parameters (the lm_head included)
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
peak = 989e12 if ("H100" in name or "H200" in name) else float(os.environ.get("PEAK_FLOPS", "nan"))
print(f"device {name}; N = {n/1e9:.3f} B matmul parameters; peak bf16 {peak/1e12:.0f} TFLOP/s")
lines = (out / "throughput.txt").read_text().splitlines() if (out / "throughput.txt").exists() else []
result = next((json.loads(l) for l in reversed(lines) if l.startswith("{")), None)
if result:
    for kind, s in result["summary"].items():
        tps = s["tokens_per_second"]
        print(f"{kind:8} {tps:8.0f} non-pad tok/s  MFU {4 * n * tps / peak:.1%}  held-out loss {s['heldout_loss']:.4f}")
    print(f"kubetune / baseline: {result['ratio']:.2f}× (pairs {result['ratios']})")
for path in sorted(out.glob("off-*.json")) + sorted(out.glob("mem-*.json")):
    r = json.loads(path.read_text())
    tps = r["tokens_per_second"]
    print(f"{path.stem:40} {tps:8.0f} tok/s  MFU {4 * n * tps / peak:.1%}  "
          f"paths {r.get('fast_paths')}  peak train GPU {r.get('peak_train_gpu_mb') or float('nan'):.0f} MiB")
mem = {k: out / f"mem-{k}.json" for k in ("lora", "qlora")}
if all(p.exists() for p in mem.values()):
    lora, qlora = (json.loads(mem[k].read_text())["peak_train_gpu_mb"] for k in ("lora", "qlora"))
    if lora and qlora:  # None without a GPU
        print(f"QLoRA / LoRA peak training memory: {qlora / lora:.2f} (target ≤ 0.45)")
PY
