"""The ``preftune`` command's allocator settings (preftune.common.allocator), measured on the real model.

Training: ``preftune train`` on the sweep's dpo settings of a finished ``preftune quickstart --real``
folder (SmolLM2-135M-Instruct, 8 HH-RLHF pairs a step, reference log-probs read from the run's cache),
``--steps`` steps in a fresh process per run, in three allocator modes taken in turn: ``system``
(``PREFTUNE_ALLOCATOR=system``: glibc's defaults), ``command`` (what the command does: sets them and
starts itself again with them, preftune.cli.launch) and ``environment`` (the same settings as ``MALLOC_*`` variables from the process's start, as
the processes the command starts get them). Evaluation: ``benchmarks/eval_stages.py`` on the run's ipo
variant (the base's share read from a copy of the run's base cache), ``system`` and ``environment``.
Seconds per step are from the run's metrics.jsonl (one row a step; the first step left out).

    python benchmarks/bench_allocator.py --run-dir runs/real --repeats 3 \\
        --results-dir benchmarks/results/2026-12-05-allocator
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preftune.common.allocator import OPT_OUT, USER_VARIABLES, settings_env  # noqa: E402

MODES = {"system": {OPT_OUT: "system"}, "command": {}, "environment": settings_env()}


def mode_env(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES and k != OPT_OUT}
    return {**env, **MODES[mode], "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def sweep_dpo_config(run_dir: Path) -> Path:
    return run_dir / "b_sweep" / "dpo" / "config.yaml"


def train_once(run_dir: Path, mode: str, steps: int, work: Path, batch_size: int) -> dict:
    out = work / f"train-{mode}"
    cmd = [sys.executable, "-m", "preftune", "train", "--config", str(sweep_dpo_config(run_dir)),
           "--output-dir", str(out), "--overwrite-output-dir", "--max-steps", str(steps),
           "--logging-steps", "1", "--ref-cache-dir", str(work / "ref_cache"), "--no-progress"]
    started = time.perf_counter()
    subprocess.run(cmd, env=mode_env(mode), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [batch_size / row["pairs_per_second"] for row in rows if row.get("pairs_per_second")][1:]
    return {"wall_s": round(wall, 1), "steps_timed": len(seconds), "s_per_step": round(statistics.mean(seconds), 3)}


def eval_once(run_dir: Path, mode: str, work: Path, base_model: str) -> dict:
    cache = work / f"base_cache-{mode}.json"
    shutil.copy(run_dir / "b_sweep" / "base_cache.json", cache)
    out = work / f"eval-{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "eval_stages.py"),
           "--model", str(run_dir / "b_sweep" / "ipo"), "--base", base_model,
           "--data", str(run_dir / "data" / "hh_held_out.jsonl"), "--judge", f"reward-model:{run_dir / 'b_rm'}",
           "--base-cache", str(cache), "--json", str(out)]
    subprocess.run(cmd, env=mode_env(mode), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return {"seconds": result["seconds"], "kl": result["kl"], "win_rate": (result["win_rate"] or {}).get("rate")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="a finished `preftune quickstart --real` folder")
    ap.add_argument("--steps", type=int, default=16, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="training runs per mode, the modes taken in turn")
    ap.add_argument("--eval-repeats", type=int, default=1, help="evaluations per mode (0: none)")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    import yaml

    config = yaml.safe_load(sweep_dpo_config(args.run_dir).read_text())  # its base model and pairs per step
    work = Path(tempfile.mkdtemp(prefix="bench-allocator-"))
    shutil.copytree(args.run_dir / "b_sweep" / "ref_cache", work / "ref_cache")
    training = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            training[mode].append(train_once(args.run_dir, mode, args.steps, work, config["batch_size"]))
            print(f"train {mode} #{repeat + 1}: {training[mode][-1]}", flush=True)
    evaluation = {mode: [] for mode in ("system", "environment")}
    for repeat in range(args.eval_repeats):
        for mode in evaluation:
            evaluation[mode].append(eval_once(args.run_dir, mode, work, config["model"]))
            print(f"eval {mode} #{repeat + 1}: {evaluation[mode][-1]}", flush=True)
    summary = {mode: round(statistics.mean(r["s_per_step"] for r in runs), 3) for mode, runs in training.items()}
    metrics = {"train_s_per_step": summary, "train_runs": training, "eval_runs": evaluation,
               "steps": args.steps, "repeats": args.repeats,
               "train_vs_system": {mode: round(summary["system"] / s, 3) for mode, s in summary.items()}}
    if evaluation["system"]:
        totals = {mode: round(statistics.mean(r["seconds"]["total"] for r in runs), 1)
                  for mode, runs in evaluation.items()}
        metrics["eval_total_s"] = totals
    print(json.dumps({k: metrics[k] for k in metrics if k not in ("train_runs", "eval_runs")}, indent=1))
    if args.results_dir:
        import bench_report

        path = bench_report.write_results(args.results_dir, "The preftune command's allocator settings", "allocator",
                                          metrics)
        print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return metrics


if __name__ == "__main__":
    main()
