"""Response groups against their expanded pairs: preftune on groups of 4 (one forward per group) vs preftune
on the same groups expanded into their 6 ordered pairs vs TRL 1.16 ``DPOTrainer`` on those pairs.

    python benchmarks/bench_groups.py                                    # the issue's setting, 2 threads
    python benchmarks/bench_groups.py --steps 2 --threads 1 --trl-prompts-per-step 1   # a short check

The model is SmolLM2-135M-Instruct (``bench_assets.smollm2_folder()``). Prompts are HH-RLHF harmless-test
prompts as chat messages (at most ``--max-prompt-tokens`` tokens under the chat template); the model samples 4
responses to each (``preftune.evaluation.sampling.sample``, temperature 1, up to ``--max-new-tokens``), cached
under benchmarks/.cache/groups so a rerun samples only prompts it has not seen. The judge is cheap: a response's
score is its length in characters (a stand-in for a real judge: only the order matters here). A group is kept
when its 4 responses are non-empty, distinct and scored differently, so it expands into exactly 6 ordered pairs.

Every contender trains the same groups, fp32, no gradient checkpointing, a live frozen reference, in a fresh
process (its own peak RSS), the first step left out of the timing (``bench_contenders``):

* ``groups``: ``preftune train`` on the groups file, ``--prompts-per-step`` groups a step (``--loss dpo``, all
  pairs of each group);
* ``expanded``: ``preftune train`` on the 6 pairs of each group, 6 x ``--prompts-per-step`` pairs a step (the same
  prompts per step);
* ``trl``: TRL 1.16 ``DPOTrainer`` on the same pairs, the same batch (``bf16=False``, no checkpointing), or
  ``--trl-prompts-per-step`` prompts' pairs a step where its padded batch does not fit in memory.

Before timing, the loss of the first groups in one forward per group is checked against the mean DPO loss of
their expanded pairs (a policy a little away from the reference; they must agree within 1e-4). Reported: tokens
forwarded per step (non-padding tokens of the policy's input), seconds per step, groups (prompts) per second,
tokens per second, peak RSS, and the ratios the issue targets (tokens <= 0.45x expanded; >= 2x expanded's
groups/s; >= 10x TRL's; peak RSS no higher than expanded).
"""

from __future__ import annotations

import argparse
import copy
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

CACHE = bench_assets.CACHE / "groups"
K = 4  # responses per prompt
FP32_NO_CKPT = dict(packing=True, mixed_precision="no", gradient_checkpointing="off")
# name -> the bench_contenders entry its worker runs, and which file / batch it trains on
CONTENDERS = {
    "groups": dict(kind="preftune", data="groups", **FP32_NO_CKPT),
    "expanded": dict(kind="preftune", data="pairs", **FP32_NO_CKPT),
    "trl": dict(kind="trl", data="pairs", overrides=dict(bf16=False, gradient_checkpointing=False)),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-per-step", type=int, default=2,
                        help="groups a step (x6 pairs for the others; at 2, expanded preftune peaks at ~13 GB RSS and "
                             "TRL at ~16 GB, fp32 without checkpointing, so 4 needs a machine with ~40 GB)")
    parser.add_argument("--trl-prompts-per-step", type=int, default=None,
                        help="TRL's prompts a step, when its padded batch of 6 x --prompts-per-step pairs does not fit "
                             "in memory (default: --prompts-per-step); its groups/s compares per prompt")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (+1 warmup step)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process (sampling too)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--only", action="append", choices=list(CONTENDERS), help="run only this contender "
                        "(repeatable); default: all three")
    parser.add_argument("--results-dir", metavar="DIR", help="write DIR/results.json for benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one contender from a JSON spec
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompts_per_step < 1:
        parser.error("--steps and --prompts-per-step must be >= 1")
    return args


# ------------------------------------------------------------------------------------------- data

def hh_prompts(tokenizer, max_prompt_tokens: int) -> list[list[dict]]:
    """HH-RLHF harmless-test prompts as chat messages, each once, in file order, that fit ``max_prompt_tokens``
    under the chat template."""
    from preftune.data.convert import convert

    messages_file = bench_assets.CACHE / f"hh-messages-{bench_assets.CACHE_VERSION}.jsonl"
    if not messages_file.exists():
        convert(bench_assets.HH_FILE, messages_file, to="messages")
    prompts, seen = [], set()
    for line in open(messages_file):
        prompt = json.loads(line)["prompt"]
        key = json.dumps(prompt)
        if key in seen:
            continue
        seen.add(key)
        if len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)) <= max_prompt_tokens:
            prompts.append(prompt)
    return prompts


def cached_samples(args, model_dir: Path, prompts: list) -> dict[str, list[str]]:
    """``{json.dumps(prompt): K responses}`` for ``prompts``: read from the cache file, the missing ones sampled
    (8 prompts at a time, appended to the file as they come)."""
    import torch

    from preftune.evaluation.sampling import sample
    from preftune.model.loading import load_model, load_tokenizer
    from preftune.model.precision import resolve_compute_dtype

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"samples-k{K}-new{args.max_new_tokens}-seed{args.seed}-{bench_assets.CACHE_VERSION}.jsonl"
    cached = {}
    if path.exists():
        cached = {row["key"]: row["responses"] for row in map(json.loads, open(path))}
    missing = [p for p in prompts if json.dumps(p) not in cached]
    if missing:
        print(f"sampling {K} responses for {len(missing)} prompts (cached: {len(cached)}) ...", flush=True)
        tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir)).eval()
        compute = resolve_compute_dtype("auto", "cpu")
        with open(path, "a") as fh, torch.no_grad():
            for start in range(0, len(missing), 8):
                chunk = missing[start:start + 8]
                texts = sample(model, tokenizer, chunk, n=K, max_new_tokens=args.max_new_tokens, temperature=1.0,
                               seed=args.seed * 100003 + len(cached) + start, batch_size=32, compute_dtype=compute)
                for prompt, responses in zip(chunk, texts):
                    cached[json.dumps(prompt)] = responses
                    fh.write(json.dumps({"key": json.dumps(prompt), "responses": responses}) + "\n")
                fh.flush()
    return {json.dumps(p): cached[json.dumps(p)] for p in prompts}


def judge(response: str) -> float:
    """The cheap judge: the response's length in characters."""
    return float(len(response))


def make_group(prompt: list, responses: list[str]) -> dict | None:
    """The group of ``responses`` scored by :func:`judge`; None unless they are non-empty, distinct and scored
    differently (so the group has exactly K(K-1)/2 ordered pairs)."""
    responses = [r.strip() for r in responses]
    scores = [judge(r) for r in responses]
    if not all(responses) or len(set(responses)) < len(responses) or len(set(scores)) < len(scores):
        return None
    return {"prompt": prompt, "responses": [[{"role": "assistant", "content": r}] for r in responses],
            "scores": scores}


def expanded_pairs(group: dict) -> list[dict]:
    """Every ordered pair of ``group`` (better first, assistant messages as TRL reads them), in the group's
    order."""
    r, s = group["responses"], group["scores"]
    return [{"prompt": group["prompt"], "chosen": r[i], "rejected": r[j]}
            for i in range(len(r)) for j in range(len(r)) if s[i] > s[j]]


def prepare(args) -> dict:
    """The model folder, and the groups file and its expanded pairs file for (steps + 1) steps."""
    from preftune.model.loading import load_tokenizer

    model_dir = bench_assets.smollm2_folder()
    tokenizer = load_tokenizer(str(model_dir))
    needed = args.prompts_per_step * (args.steps + 1)
    prompts = hh_prompts(tokenizer, args.max_prompt_tokens)
    groups: list[dict] = []
    offset = 0
    while len(groups) < needed:  # sample more prompts until enough groups survive the judge
        if offset >= len(prompts):
            raise ValueError(f"only {len(groups)} usable groups among {len(prompts)} prompts; {needed} needed")
        batch = prompts[offset:offset + (needed - len(groups)) + 4]
        offset += len(batch)
        samples = cached_samples(args, model_dir, batch)
        groups += [g for p in batch if (g := make_group(p, samples[json.dumps(p)])) is not None]
    groups = groups[:needed]
    tag = f"{needed}-new{args.max_new_tokens}-seed{args.seed}"
    groups_file, pairs_file = CACHE / f"groups-{tag}.jsonl", CACHE / f"pairs-{tag}.jsonl"
    groups_file.write_text("".join(json.dumps(g) + "\n" for g in groups))
    pairs_file.write_text("".join(json.dumps(p) + "\n" for g in groups for p in expanded_pairs(g)))
    return {"model_dir": model_dir, "groups_file": groups_file, "pairs_file": pairs_file, "groups": groups,
            "prompts_scanned": offset}


# ------------------------------------------------------------------------------------ loss check

def loss_check(model_dir: Path, groups_file: Path, pairs_file: Path, n_groups: int = 2) -> dict:
    """All-pairs DPO of the first ``n_groups`` groups in one forward per group, and the mean DPO loss of their
    expanded pairs, with a policy a little away from the reference (fp32)."""
    import torch

    from preftune.config.train_config import TrainConfig
    from preftune.data.collate import collate_packed
    from preftune.data.load import read_examples
    from preftune.model.loading import load_model, load_tokenizer
    from preftune.model.logprobs import LogProbModel
    from preftune.training.reference import ModelReference
    from preftune.training.step import batch_objective

    tokenizer = load_tokenizer(str(model_dir))
    reference_model = load_model(str(model_dir)).eval()
    policy = copy.deepcopy(reference_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator))
    pairs_per_group = K * (K - 1) // 2
    groups, _ = read_examples(tokenizer, str(groups_file), False, kind="group", limit=n_groups)
    pairs, _ = read_examples(tokenizer, str(pairs_file), False, kind="pair", limit=n_groups * pairs_per_group)
    cfg = TrainConfig(model=str(model_dir), data=str(groups_file), loss="dpo", beta=0.1)
    reference = ModelReference(reference_model, policy=policy)
    losses = []
    with torch.no_grad():
        for examples in (groups[:n_groups], pairs[:n_groups * pairs_per_group]):
            loss, _ = batch_objective(cfg, collate_packed(examples, pad_id=tokenizer.pad_token_id),
                                      LogProbModel(policy), reference)
            losses.append(float(loss))
    return {"groups": n_groups, "group_loss": losses[0], "expanded_loss": losses[1],
            "abs_difference": abs(losses[0] - losses[1]), "equal_within_1e-4": abs(losses[0] - losses[1]) <= 1e-4}


# --------------------------------------------------------------------------------------- workers

def run_worker(spec: dict, log_path: Path) -> dict:
    """One contender in a fresh Python process (this script with ``--worker``); its stderr goes to ``log_path``."""
    threads = str(spec["threads"])
    return bench_contenders.run_worker_process(__file__, spec, log_path, dict(
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads))


def worker(spec: dict) -> dict:
    """In the worker process: register this benchmark's contenders with ``bench_contenders`` and run one."""
    for name, entry in CONTENDERS.items():
        bench_contenders.CONTENDERS[name] = {k: v for k, v in entry.items() if k != "data"}
    return bench_contenders.run(spec)


def summarize(name: str, result: dict, counts: dict, threads: int, pairs_per_prompt: int) -> dict:
    """``bench_report.summarize`` plus tokens forwarded per step and groups (prompts) per second."""
    summary = bench_report.summarize(name, result, counts, threads)
    batches = result["batches"][1:1 + summary["timed_steps"]]
    seconds = summary["seconds_per_step"] * summary["timed_steps"]
    summary["forwarded_tokens_per_step"] = sum(b["real_tokens"] for b in batches) / len(batches)
    summary["examples_per_step"] = sum(b["pairs"] for b in batches) / len(batches)
    summary["groups_per_second"] = sum(b["pairs"] for b in batches) / pairs_per_prompt / seconds
    summary["forwarded_tokens_per_second"] = summary["forwarded_tokens_per_step"] / summary["seconds_per_step"]
    return summary


def run_contenders(args, names: list[str], data: dict, counts: dict) -> tuple[list[dict], list[str]]:
    log_dir = CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    summaries, failed = [], []
    for name in names:
        entry = CONTENDERS[name]
        per_prompt = 1 if entry["data"] == "groups" else K * (K - 1) // 2
        prompts = (args.trl_prompts_per_step or args.prompts_per_step) if name == "trl" else args.prompts_per_step
        spec = dict(name=name, model_dir=str(data["model_dir"]), pairs_file=str(data[f"{entry['data']}_file"]),
                    batch_size=prompts * per_prompt, max_length=args.max_length, dtype="float32",
                    device="cpu", threads=args.threads, steps=args.steps + 1)
        print(f"running {name}: {spec['batch_size']} {entry['data']} a step, {spec['steps']} steps "
              "(first = warmup) ...", flush=True)
        try:
            result = run_worker(spec, log_dir / f"{name}.log")
        except RuntimeError as exc:  # one broken contender should not cost the others' numbers
            print(f"  FAILED: {exc}", flush=True)
            failed.append(name)
            continue
        s = summarize(name, result, counts, args.threads, per_prompt)
        summaries.append(s)
        print(f"  {s['seconds_per_step']:.2f} s/step, {s['groups_per_second']:.3f} groups/s, "
              f"{s['forwarded_tokens_per_step']:.0f} tokens forwarded/step, peak RSS {s['peak_rss_gb']:.2f} GB, "
              f"first loss {s['first_loss']:.4f}", flush=True)
    return summaries, failed


def ratios(summaries: list[dict]) -> dict:
    """The issue's ratios, where both contenders ran."""
    by = {s["name"]: s for s in summaries}
    out = {}
    if "groups" in by and "expanded" in by:
        g, e = by["groups"], by["expanded"]
        out["tokens_group_vs_expanded"] = g["forwarded_tokens_per_step"] / e["forwarded_tokens_per_step"]
        out["speedup_vs_expanded"] = g["groups_per_second"] / e["groups_per_second"]
        out["peak_rss_group_vs_expanded"] = g["peak_rss_gb"] / e["peak_rss_gb"]
    if "groups" in by and "trl" in by:
        out["speedup_vs_trl"] = by["groups"]["groups_per_second"] / by["trl"]["groups_per_second"]
        out["tokens_group_vs_trl"] = by["groups"]["forwarded_tokens_per_step"] / by["trl"]["forwarded_tokens_per_step"]
    return {k: round(v, 4) for k, v in out.items()}


def metrics_record(args, data: dict, check: dict, summaries: list[dict], failed: list[str], load: list) -> dict:
    """results.json metrics: settings, the ratios as top-level numbers (docs/results.md shows those), each
    contender's row."""
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
             if k in ("name", "timed_steps", "seconds_per_step", "groups_per_second", "examples_per_step",
                      "forwarded_tokens_per_step", "forwarded_tokens_per_second", "peak_rss_gb", "first_loss",
                      "cpu_busy", "settings")} for s in summaries]
    flat = {f"{s['name']}_{key}": round(s[key], 4) for s in summaries
            for key in ("seconds_per_step", "groups_per_second", "forwarded_tokens_per_step", "peak_rss_gb")}
    responses = [len(r[0]["content"]) for g in data["groups"] for r in g["responses"]]
    return {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "prompts_per_step": args.prompts_per_step,
            "trl_prompts_per_step": args.trl_prompts_per_step or args.prompts_per_step,
            "responses_per_prompt": K, "timed_steps": args.steps, "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length, "groups": len(data["groups"]),
            "mean_response_chars": round(sum(responses) / len(responses), 1),
            "load_average_1min_before_after": " / ".join(f"{x:.2f}" for x in load),
            "loss_group": round(check["group_loss"], 6), "loss_expanded": round(check["expanded_loss"], 6),
            "loss_abs_difference": check["abs_difference"], **ratios(summaries), **flat,
            "failed": ", ".join(failed) or "none", "contenders": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        bench_contenders.print_result(worker(json.loads(args.worker)))
        return 0
    import torch
    from transformers import AutoConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    data = prepare(args)
    lengths = [len(r[0]["content"]) for g in data["groups"] for r in g["responses"]]
    print(f"{len(data['groups'])} groups of {K} (from {data['prompts_scanned']} prompts), responses "
          f"{min(lengths)}-{max(lengths)} characters; {data['groups_file']}", flush=True)
    check = loss_check(data["model_dir"], data["groups_file"], data["pairs_file"])
    print(f"loss check ({check['groups']} groups): one forward per group {check['group_loss']:.6f}, expanded "
          f"pairs {check['expanded_loss']:.6f}, |difference| {check['abs_difference']:.2e}", flush=True)
    counts = bench_report.model_counts(AutoConfig.from_pretrained(data["model_dir"]))
    summaries, failed = run_contenders(args, args.only or list(CONTENDERS), data, counts)
    load.append(os.getloadavg()[0])
    for key, value in ratios(summaries).items():
        print(f"{key}: {value:.3f}")
    print(f"load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}")
    if args.results_dir:
        path = bench_report.write_results(args.results_dir, "Response groups vs expanded pairs, SmolLM2-135M on "
                                          "CPU", "groups", metrics_record(args, data, check, summaries, failed, load))
        print(f"wrote {path}")
    return 1 if failed or not check["equal_within_1e-4"] else 0


if __name__ == "__main__":
    sys.exit(main())
