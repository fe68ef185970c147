#!/usr/bin/env bash
# The GPU check of the real-model engine issue, one script (a few minutes on an H200; not yet run):
# a random model with Qwen2.5-0.5B's shape and its 151,936 vocabulary (tied head), 32 HH-RLHF pairs per
# step up to 1024 tokens, bf16 mixed precision on both sides (fp32 weights, bf16 autocast):
# TRL 1.16 defaults, TRL + use_liger_kernel=True, preftune defaults (--mixed-precision auto = bf16 on a
# GPU with bf16). Targets: preftune >= 2x TRL defaults and >= 1.5x TRL + Liger in pairs/s, at no more
# peak GPU memory than TRL + Liger.
#
#   bash benchmarks/gpu_issue12.sh [HH_FILE] [OUT_DIR]
#
# Needs trl==1.16.0 and liger-kernel in the environment; a .whl/ folder of wheels (for a machine without
# network: `pip download trl==1.16.0 liger-kernel -d .whl`) is installed first.
. "$(dirname "$0")/gpu_env.sh" runs/gpu-issue12 "$@"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 540 python3 benchmarks/dpo_throughput.py --device cuda --model-size qwen0.5b --dtype bfloat16 \
  --batch-size 32 --max-length 1024 --steps 6 --preftune-repeats 1 --threads 8 --hh-file "$HH" \
  --only trl-default --only trl-liger --only preftune --markdown --json "$LOGS/qwen0.5b-bf16.json" \
  2>&1 | tee "$LOGS/qwen0.5b-bf16.log"
