"""Turning per-step records into throughput numbers, the ideal FLOP count, and tables.

Ideal FLOPs of one DPO pair (the work no implementation can skip):

    8 * N * U  +  8 * h * V * C

* ``N`` non-embedding parameters (the decoder layers; the input embedding is a lookup and the
  output head is counted separately), ``U`` unique tokens of the pair (prompt once + chosen +
  rejected), ``h`` hidden size, ``V`` vocabulary, ``C`` completion tokens (chosen + rejected,
  EOS included).
* A matmul with a ``(k, m)`` weight costs 2 k m FLOPs per token forward (multiply + add) and
  4 k m backward (gradients of the input and of the weight): 6 per parameter per token for the
  trained policy, plus 2 for the frozen reference's forward: 8.
* The output head is only needed where a completion token is predicted, so it is charged on
  ``C`` tokens, not ``U`` (h V parameters, same 6 + 2).
* Not counted: attention scores (``QK^T`` and ``AV``, ~4 L h FLOPs per token per layer
  forward at context L), norms, activations, the softmax over the vocabulary, the optimizer.
  So measured "useful" FLOP/s below the ideal is an underestimate of the hardware's busy-ness,
  and the share of peak is a lower bound on utilisation.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets")


def model_counts(config) -> dict:
    """Parameter counts of a causal LM config, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    non_embedding = total - embed - (0 if tied else head)
    return {"total": total, "non_embedding": non_embedding, "hidden": config.hidden_size,
            "vocab": config.vocab_size}


def ideal_flops(counts: dict, unique_tokens: int, completion_tokens: int) -> float:
    """Ideal training FLOPs (policy forward + backward, reference forward) for these tokens."""
    return 8 * counts["non_embedding"] * unique_tokens + 8 * counts["hidden"] * counts["vocab"] * completion_tokens


def _per_step(window: dict | None, key: str) -> float | None:
    return window[key] / window["steps"] if window and window["steps"] else None


def _busy(window: dict | None, threads: int) -> float | None:
    """CPU seconds / (wall seconds x threads): ~1 when the run had its threads' cores to itself."""
    if not window or not window["wall_seconds"] or not threads:
        return None
    return window["cpu_seconds"] / (window["wall_seconds"] * threads)


def summarize(name: str, result: dict, counts: dict, threads: int = 0, skip: int = 1) -> dict:
    """Steady-state numbers over the steps after the first ``skip`` (warmup)."""
    seconds = result["step_seconds"][skip:]
    batches = result["batches"][skip:skip + len(seconds)]
    if not seconds or len(batches) != len(seconds):
        raise ValueError(f"{name}: {len(result['step_seconds'])} timed steps and {len(result['batches'])} "
                         "batches recorded; need at least 2 steps with one batch each")
    time_s = sum(seconds)
    pairs = sum(b["pairs"] for b in batches)
    tokens = sum(b["sequence_tokens"] for b in batches)
    flops = sum(ideal_flops(counts, b["unique_tokens"], b["completion_tokens"]) for b in batches)
    slots = sum(b["slots"] for b in batches)
    real = sum(b["real_tokens"] for b in batches)
    return {
        "name": name, "timed_steps": len(seconds), "seconds_per_step": time_s / len(seconds),
        "step_seconds_median": statistics.median(seconds),
        "pairs_per_second": pairs / time_s, "tokens_per_second": tokens / time_s,
        "tokens_per_pair": tokens / pairs, "ideal_flops_per_second": flops / time_s,
        "padding_share": 1 - real / slots if slots else 0.0,
        "peak_rss_gb": result.get("peak_rss_bytes", 0) / 1e9,
        "peak_gpu_gb": result["peak_gpu_bytes"] / 1e9 if "peak_gpu_bytes" in result else None,
        "first_loss": result["losses"][0] if result.get("losses") else None,
        "cpu_seconds_per_step": _per_step(result.get("cpu_window"), "cpu_seconds"),
        "cpu_busy": _busy(result.get("cpu_window"), threads),
        "other_load_cores": result.get("other_load_cores"),
        "settings": result.get("settings", {}),
    }


COLUMNS = [
    ("contender", lambda r, peak: r["name"]),
    ("s/step", lambda r, peak: f"{r['seconds_per_step']:.3f}"),
    ("pairs/s", lambda r, peak: f"{r['pairs_per_second']:.2f}"),
    ("tokens/s", lambda r, peak: f"{r['tokens_per_second']:.0f}"),
    ("tok/pair", lambda r, peak: f"{r['tokens_per_pair']:.0f}"),
    ("padding", lambda r, peak: f"{100 * r['padding_share']:.0f}%"),
    ("threads busy", lambda r, peak: "-" if r["cpu_busy"] is None else f"{100 * r['cpu_busy']:.0f}%"),
    ("other load", lambda r, peak: "-" if r.get("other_load_cores") is None else f"{r['other_load_cores']:.2f}"),
    ("peak RSS GB", lambda r, peak: f"{r['peak_rss_gb']:.2f}"),
    ("peak GPU GB", lambda r, peak: "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.2f}"),
    ("ideal GFLOP/s", lambda r, peak: f"{r['ideal_flops_per_second'] / 1e9:.1f}"),
    ("% matmul peak", lambda r, peak: f"{100 * r['ideal_flops_per_second'] / peak:.1f}%" if peak else "-"),
]


def table_rows(summaries: list[dict], peak: float | None, gpu: bool) -> tuple[list[str], list[list[str]]]:
    hidden = ("threads busy", "other load") if gpu else ("peak GPU GB",)
    columns = [c for c in COLUMNS if c[0] not in hidden]
    return [c[0] for c in columns], [[fn(s, peak) for _, fn in columns] for s in summaries]


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = "|".join("---" if i == 0 else "---:" for i in range(len(header)))  # numbers right-aligned
    out = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ratios(summaries: list[dict]) -> list[tuple[str, str, float, float]]:
    """(preftune row, TRL row, pairs/s ratio, tokens/s ratio) for every preftune x TRL pair."""
    mine = [s for s in summaries if s["name"].startswith("preftune")]
    theirs = [s for s in summaries if s["name"].startswith("trl")]
    return [(p["name"], t["name"], p["pairs_per_second"] / t["pairs_per_second"],
             p["tokens_per_second"] / t["tokens_per_second"]) for p in mine for t in theirs]


def throughput_metrics(payload: dict) -> dict:
    """The ``metrics`` of a results.json from ``dpo_throughput.py``'s full payload (its ``--json`` file)."""
    args, peak = payload["args"], payload["matmul_peak"]["flops_per_second"]
    rows = [{"name": s["name"], "seconds_per_step": _round(s["seconds_per_step"]),
             "pairs_per_second": _round(s["pairs_per_second"]), "tokens_per_second": _round(s["tokens_per_second"], 1),
             "tokens_per_pair": _round(s["tokens_per_pair"], 1), "padding_share": _round(s["padding_share"]),
             "peak_rss_gb": _round(s["peak_rss_gb"], 3), "peak_gpu_gb": _round(s["peak_gpu_gb"], 3),
             "ideal_gflops_per_second": _round(s["ideal_flops_per_second"] / 1e9, 2),
             "share_of_matmul_peak": _round(s["ideal_flops_per_second"] / peak) if peak else None,
             "timed_steps": s["timed_steps"], "first_loss": _round(s["first_loss"]),
             "other_load_cores": _round(s["other_load_cores"], 3), "settings": s["settings"]}
            for s in payload["summaries"]]
    pairs = [{"preftune": p, "trl": t, "pairs_per_second": round(a, 3), "tokens_per_second": round(b, 3)}
             for p, t, a, b in ratios(payload["summaries"])]
    return {"model": args["model_size"], "device": args["device"], "dtype": args["dtype"], "threads": args["threads"],
            "batch_size": args["batch_size"], "max_length": args["max_length"], "pairs": payload["pairs"],
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "ideal_gflop_per_pair": round(payload["ideal_flops_per_pair"] / 1e9, 2),
            "contenders": rows, "ratios": pairs}


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)


# ---- results.json: one run's command, commit, date, hardware, versions and metrics

def cpu_info(cpuinfo: str | None = None) -> dict:
    """``{"cpu", "flags", "cores"}`` from /proc/cpuinfo (``cpuinfo``: its text); flags limited to ``CPU_FLAGS``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name") or platform.processor() or None,
            "flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count()}


def gpu_name() -> str | None:
    """The first CUDA device's name when torch is already imported and sees one, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def package_versions() -> dict:
    """Python's and each of ``PACKAGES``' installed version (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse --short HEAD`` of the checkout, or None outside git."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def command_line(argv: list[str] | None = None) -> str:
    """The command that runs this process, paths inside the repository made relative to it and
    ``--results-dir DIR`` left out (where the record is written is not part of what was measured)."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--results-dir="):
            skip = False
            continue
        if arg == "--results-dir":
            skip = True
            continue
        kept.append(arg)
    text = shlex.join(["python", *kept])
    return text.replace(str(REPO) + os.sep, "")


def results_record(name: str, kind: str, metrics: dict, argv: list[str] | None = None,
                   notes: str | None = None) -> dict:
    """A results.json record (the schema ``benchmarks/results_tables.py`` checks) for this process's run."""
    return {"name": name, "kind": kind, "command": [command_line(argv)], "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "hardware": {**cpu_info(), "gpu": gpu_name()}, "versions": package_versions(),
            "metrics": metrics, "notes": notes}


def write_results(folder: str | Path, name: str, kind: str, metrics: dict, argv: list[str] | None = None,
                  notes: str | None = None) -> Path:
    """Write ``folder/results.json`` for this run (folder created); returns its path.

    Copy the folder under ``benchmarks/results/`` and run ``python benchmarks/results_tables.py`` to
    put it in docs/results.md.
    """
    path = Path(folder) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = results_record(name, kind, metrics, argv, notes)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path
