"""bf16 vs fp32 matmul throughput on this CPU: the benchmarks' square torch.mm peak
(bench_contenders.run_matmul_peak) and one linear of SmolLM2-135M's MLP shape.
Run: .venv/bin/python benchmarks/results/2026-12-03-real-recipe-intel-partial/matmul_gflops.py"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_contenders import run_matmul_peak  # noqa: E402

for dtype in ("float32", "bfloat16"):
    peak = run_matmul_peak({"device": "cpu", "dtype": dtype, "threads": 2})
    print(f"torch.mm peak {dtype}: {peak['flops_per_second'] / 1e9:.0f} GFLOP/s (n={peak['n']})")
x, w = torch.randn(2048, 576), torch.randn(1536, 576)  # tokens x hidden @ hidden x MLP width
for dtype in (torch.float32, torch.bfloat16):
    xx, ww = x.to(dtype), w.to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(xx, ww)
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(xx, ww)
    rate = 2 * 2048 * 576 * 1536 * reps / (time.perf_counter() - start)
    print(f"linear 2048x576x1536 {dtype}: {rate / 1e9:.0f} GFLOP/s")
