#!/usr/bin/env bash
# The GPU checks of the scale-out and speed issues, in one go on one GPU (about 8 minutes on an H200):
#
#   1. FSDP2 full shard on one GPU (`--accelerate-config configs/accelerate/fsdp.yaml`), bf16, the
#      random ~0.42B Llama of the benchmark, DPO with --precompute-ref: pairs/s and peak GPU memory;
#      the same run without FSDP for comparison;
#   2. `benchmarks/dpo_throughput.py --device cuda --model-size 0.5b --dtype bfloat16`: preftune vs TRL;
#   3. FSDP checkpoint + resume: a run killed right after its step-4 checkpoint and resumed to step 8
#      against the uninterrupted 8-step run (weights compared);
#   4. FSDP with LoRA (adapters-off reference) and with a live frozen reference copy.
#
#   bash benchmarks/gpu_checks.sh [HH_FILE] [OUT_DIR]
#
# HH_FILE defaults to preftune/recipes/data/hh-rlhf-harmless-test.jsonl.gz; OUT_DIR to $OUT or runs/gpu-checks.
# Each part has its own time limit and a failing part does not stop the others. With a .whl/ folder
# (trl, datasets and their needs for a machine without network), those wheels are installed first.
. "$(dirname "$0")/gpu_env.sh" runs/gpu-checks "$@"
WORK=${WORK:-/tmp/preftune-gpu}
SIZE=${SIZE:-0.5b}  # SIZE=tiny-bench SKIP_BENCH=1: a quick dry run of the script on a CPU
rm -rf "$WORK"; mkdir -p "$WORK"
start=$(date +%s)
part() { echo; echo "=== $1 ($(( $(date +%s) - start )) s in)"; }

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, accelerate, peft; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft',
peft.__version__); import trl, datasets; print('trl', trl.__version__, '| datasets', datasets.__version__)"

part "assets: the benchmark's tokenizer and random 0.42B Llama"
MODEL=$(timeout 120 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
import bench_assets
a = bench_assets.prepare('$SIZE', 88, 512, hh_file='$HH')
print(a.model_dir)" | tail -1)
echo "model: $MODEL"

train() {  # train NAME LIMIT_S ARGS...: one preftune run, its metrics and summary shown
  local name=$1 limit=$2; shift 2
  part "$name"
  timeout "$limit" python3 -m preftune.cli train --model "$MODEL" --mixed-precision bf16 --no-progress \
    --output-dir "$WORK/${DIR:-$name}" "$@" > "$LOGS/$name.log" 2>&1
  echo "exit $?"
  grep -E "ERROR|Error|launching|reference|done:|held-out" "$LOGS/$name.log" | tail -8
  python3 - "$WORK/${DIR:-$name}" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
for r in rows:
    if "pairs_per_second" in r:
        print(f"  step {r['step']:>3}: loss {r['loss']:.4f}, {r['pairs_per_second']:.1f} pairs/s, "
              f"{r['tokens_per_second']:.0f} tokens/s, peak GPU {r.get('gpu_peak_memory_gib', float('nan')):.2f} GiB")
if (out / "summary.json").exists():
    s = json.loads((out / "summary.json").read_text())
    print("  summary:", {k: s.get(k) for k in ("steps", "processes", "distributed", "reference", "packing",
                                                 "gpu_peak_memory_gib")})
EOF
}

SMOKE=(--data "$HH" --skip-bad-records --max-examples 640 --batch-size 8 --max-steps 40 --logging-steps 10)
train fsdp-smoke 240 "${SMOKE[@]}" --precompute-ref --accelerate-config configs/accelerate/fsdp.yaml
train plain-1gpu 180 "${SMOKE[@]}" --precompute-ref

part "benchmark: preftune vs TRL, 0.42B Llama, bf16"
[ -n "${SKIP_BENCH:-}" ] || timeout 330 python3 benchmarks/dpo_throughput.py --device cuda --model-size 0.5b --dtype bfloat16 --steps 10 \
  --threads 8 --hh-file "$HH" --json "$LOGS/bench.json" --markdown > "$LOGS/bench.log" 2>&1
echo "exit $?"
sed -n '/matmul peak used/,$p' "$LOGS/bench.log"

# Checkpoint + resume under FSDP: constant lr 1e-4 (bf16 weights need a step that moves them).
RESUME=(--data "$HH" --skip-bad-records --max-examples 64 --batch-size 8 --max-steps 8 --save-steps 4
        --learning-rate 1e-4 --lr-scheduler constant --warmup-steps 0 --precompute-ref
        --accelerate-config configs/accelerate/fsdp.yaml --logging-steps 4)
train fsdp-straight 150 "${RESUME[@]}"
PREFTUNE_TEST_CRASH_IN_CHECKPOINT=after_rename:4 DIR=fsdp-resumed train fsdp-killed-at-4 150 "${RESUME[@]}"
ls "$WORK/fsdp-resumed/checkpoints" 2>&1
train fsdp-resumed 150 "${RESUME[@]}" --resume-from latest
part "resume check"
python3 - "$MODEL" "$WORK/fsdp-straight" "$WORK/fsdp-resumed" <<'EOF'
import sys
import torch
from safetensors.torch import load_file
base, a, b = (load_file(f"{p}/model.safetensors") for p in sys.argv[1:])
moved = max((a[k].float() - base[k].float()).abs().max().item() for k in a)
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
same = sum(torch.equal(a[k], b[k]) for k in a)
print(f"uninterrupted vs killed-at-4-and-resumed: max |diff| {diff:.3g} ({same}/{len(a)} tensors bit-equal); "
      f"the run moved weights by up to {moved:.3g}")
EOF

train fsdp-lora 150 --data "$HH" --skip-bad-records --max-examples 160 --batch-size 8 --max-steps 20 \
  --logging-steps 10 --lora-r 16 --learning-rate 1e-4 --accelerate-config configs/accelerate/fsdp.yaml
train fsdp-live-ref 150 --data "$HH" --skip-bad-records --max-examples 160 --batch-size 8 --max-steps 20 \
  --logging-steps 10 --accelerate-config configs/accelerate/fsdp.yaml
part "end"
