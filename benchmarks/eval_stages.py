"""Where an evaluation's time goes: ``preftune.evaluation.evaluate.evaluate_model`` with each stage timed.

The stages are the functions ``evaluate_model`` calls (held-out pair log-probs, NLL, sampling, the KL
log-probs, judging), each timed by wrapping it; the model is evaluated against ``--base`` exactly as
a ``compare`` sweep's variant is (``--base-cache FILE``: as the second and later variants are, once
FILE holds the base's share). Run it from two checkouts (``PYTHONPATH=...``) on the same model and
data to compare code versions; stored runs: the ``eval-stages`` results in benchmarks/results/.

    python benchmarks/eval_stages.py --model runs/real/b_sweep/dpo --base ~/.cache/preftune/SmolLM2-135M-Instruct \\
        --data runs/real/data/hh_held_out.jsonl --judge reward-model:runs/real/b_rm --generate 240 --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections import defaultdict

STAGES = {"pair_logps": "held-out pair log-probs", "total_nll": "NLL", "sample_token_ids": "sampling (model)",
          "sample_scored": "sampling (model)", "sample": "sampling (base)",
          "completion_logps": "KL log-probs (model, base)",
          "completion_logps_with_states": "KL log-probs (model, base)",
          "states_for": "base prompt states", "score": "judge scores"}
# (module, function) pairs timed where the checkout has them: before the sampler scored its own samples,
# evaluate called sample_token_ids and completion_logps (model and base); now sample_and_kl calls sampling's
# sample_scored (the model's log-probs come with the samples) and completion_logps (the base only); with
# prompt states the base scores on its prompts' kept states (states_for: computed or read back, then
# completion_logps_with_states), and the judge's score includes its own prompt states
TIMED = (("evaluate", "pair_logps"), ("evaluate", "total_nll"), ("evaluate", "sample_token_ids"),
         ("evaluate", "sample"), ("evaluate", "completion_logps"), ("sampling", "sample_scored"),
         ("sampling", "completion_logps"), ("sampling", "states_for"), ("sampling", "completion_logps_with_states"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True, help="held-out pairs")
    ap.add_argument("--judge", default=None)
    ap.add_argument("--generate", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--mixed-precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-cache", default=None)
    ap.add_argument("--json", default=None, help="write the timings and headline metrics here")
    ap.add_argument("--results-dir", metavar="DIR",
                    help="write DIR/results.json (command, commit, date, hardware, versions, metrics) for "
                         "benchmarks/results/ and benchmarks/results_tables.py")
    ap.add_argument("--label", default="this run", help="the column name of these timings in --results-dir's table")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    ev = importlib.import_module("preftune.evaluation.evaluate")
    modules = {"evaluate": ev, "sampling": importlib.import_module("preftune.evaluation.sampling")}
    judges = importlib.import_module("preftune.evaluation.judges.reward_model")
    seconds: dict[str, float] = defaultdict(float)

    def timed(owner, name):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                seconds[STAGES[name]] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    for module, name in TIMED:
        if hasattr(modules[module], name):
            timed(modules[module], name)
    timed(judges.RewardModelJudge, "score")
    start = time.perf_counter()
    from preftune.config.eval_config import EvalConfig

    result = ev.evaluate_model(EvalConfig(
        model=args.model, data=args.data, ref_model=args.base, generate=args.generate, judge=args.judge,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, mixed_precision=args.mixed_precision, seed=0,
        base_cache=args.base_cache))
    total = time.perf_counter() - start
    gen = result["generation"] or {}
    out = {"seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(total, 1)},
           "accuracy": result["preference"]["accuracy"], "win_rate": gen.get("win_rate"), "kl": gen.get("kl"),
           "base_cache": result.get("base_cache")}
    for name, value in out["seconds"].items():
        print(f"{name:28s} {value:8.1f} s")
    print(f"accuracy {out['accuracy']:.4f}  win rate {(out['win_rate'] or {}).get('rate')}  kl {out['kl']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.results_dir:
        write_results(args, out)
    return out


def write_results(args, out: dict) -> None:
    """``args.results_dir``/results.json: the stage seconds as one column (``--label``) and the headline metrics."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_report

    win = (out["win_rate"] or {}).get("rate")
    metrics = {"seconds": {args.label: out["seconds"]}, "accuracy": round(out["accuracy"], 4),
               "win_rate": None if win is None else round(win, 4), "kl": out["kl"],
               "prompts": args.generate, "batch_size": args.batch_size, "threads": args.threads}
    path = bench_report.write_results(args.results_dir, "Evaluation time by stage", "eval-stages", metrics)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
