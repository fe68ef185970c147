"""Write docs/results.md from every benchmarks/results/<run>/results.json.

    python benchmarks/results_tables.py            # regenerate docs/results.md
    python benchmarks/results_tables.py --check    # exit 1 if docs/results.md is not what would be generated

Each results folder holds one ``results.json`` (see ``bench_report.write_results`` and
``benchmarks/README.md``): ``name``, ``kind``, ``command``, ``commit``, ``date``, ``hardware``
(``cpu``, ``flags``, ``cores``, ``gpu``), ``versions``, ``metrics``, ``notes``. The page has one
section per ``kind``: a table of the latest run of that kind (by date, then folder name), every row
naming its hardware, and a list of the older runs with their dates and hardware. A run marked
``"partial": true`` (stopped before the end) is shown as the latest only when no complete run exists. The output depends
only on the files, so regenerating without a change gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "results.md"
COMMAND = "python benchmarks/results_tables.py"

REQUIRED = {"name": str, "kind": str, "command": list, "commit": (str, type(None)), "date": str,
            "hardware": dict, "versions": dict, "metrics": dict, "notes": (str, type(None))}
HARDWARE = {"cpu": (str, type(None)), "flags": list, "cores": (int, type(None)), "gpu": (str, type(None))}
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SHOWN_FLAGS = ("avx512_bf16", "amx_bf16", "avx2")  # the flags that decide bf16 speed on a CPU


# ---- reading and checking

def problems(data: object) -> list[str]:
    """What is wrong with one parsed results.json: missing keys, wrong types, a malformed date."""
    if not isinstance(data, dict):
        return ["not a JSON object"]
    found = []
    for key, kind in REQUIRED.items():
        if key not in data:
            found.append(f"missing key {key!r}")
        elif not isinstance(data[key], kind):
            found.append(f"{key!r} has type {type(data[key]).__name__}")
    if isinstance(data.get("command"), list) and not all(isinstance(c, str) for c in data["command"]):
        found.append("'command' must be a list of strings")
    if "partial" in data and not isinstance(data["partial"], bool):
        found.append("'partial' must be true or false")
    if isinstance(data.get("date"), str) and not DATE.match(data["date"]):
        found.append(f"'date' is {data['date']!r}, not YYYY-MM-DD")
    for key, kind in HARDWARE.items():
        hardware = data.get("hardware")
        if isinstance(hardware, dict) and (key not in hardware or not isinstance(hardware[key], kind)):
            found.append(f"'hardware' needs {key!r} of type {kind}")
    return found


def load_results(root: Path = RESULTS) -> list[tuple[str, dict]]:
    """``(folder name, results.json)`` for every folder under ``root``, sorted by folder name.

    Raises ValueError naming each folder without a results.json or with an invalid one.
    """
    out, errors = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "results.json"
        if not path.is_file():
            errors.append(f"{folder.name}: no results.json")
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            errors.append(f"{folder.name}/results.json: {exc}")
            continue
        errors += [f"{folder.name}/results.json: {p}" for p in problems(data)]
        out.append((folder.name, data))
    if errors:
        raise ValueError("invalid benchmark results:\n  " + "\n  ".join(errors))
    return out


# ---- formatting helpers

def num(value, digits: int = 2, unit: str = "") -> str:
    """``value`` with ``digits`` decimals, ``-`` for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def pct(value, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def interval(d: dict | None, digits: int = 3) -> str:
    """``rate [low, high]`` from a dict with ``rate``/``value``, ``low``, ``high``."""
    if not d:
        return "-"
    value = d.get("rate", d.get("value"))
    if d.get("low") is None:
        return num(value, digits)
    return f"{value:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def win_text(w: dict | None) -> str:
    if not w:
        return "-"
    counts = "" if w.get("wins") is None else f" ({w['wins']} / {w['losses']} / {w['ties']})"
    return f"{interval(w)}, n = {w['n']}{counts}"


def hardware_label(hw: dict) -> str:
    """A short name for the hardware: the GPU, or the CPU with its core count and bf16-relevant flags."""
    if hw.get("gpu"):
        return hw["gpu"]
    cpu = re.sub(r"\s*\([^)]*\)|\(R\)", "", hw.get("cpu") or "CPU, model not recorded").strip()
    parts = [cpu]
    if hw.get("cores"):
        parts.append(f"{hw['cores']} cores")
    flags = [f for f in SHOWN_FLAGS if f in hw.get("flags", [])]
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        flags = [f for f in flags if f != "avx2"]
    if flags:
        parts.append("+".join(flags))
    return ", ".join(parts)


def versions_label(versions: dict) -> str:
    shown = [f"{k} {v}" for k, v in sorted(versions.items()) if v]
    return ", ".join(shown) if shown else "not recorded"


def table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first ``text_columns`` and the last column left-aligned, numbers right-aligned."""
    align = ["---" if i < text_columns or i == len(header) - 1 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def with_hardware(header: list[str], rows: list[list[str]], hw: dict, text_columns: int = 1) -> str:
    """``table`` with a last column naming the hardware of every row."""
    label = hardware_label(hw)
    return table(header + ["hardware"], [row + [label] for row in rows], text_columns)


# ---- one renderer per kind: results.json -> Markdown tables

RATIO_ROWS = ("preftune", "preftune-padded")  # preftune's defaults, and the same without packing


def throughput_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    gpu = any(c.get("peak_gpu_gb") is not None for c in m["contenders"])
    header = ["contender", "s/step", "pairs/s", "tokens/s", "padding", "peak RSS GB"] + (["peak GPU GB"] if gpu else [])
    rows = []
    for c in m["contenders"]:
        row = [c["name"], num(c["seconds_per_step"], 3), num(c["pairs_per_second"]), num(c["tokens_per_second"], 0),
               pct(c["padding_share"]), num(c["peak_rss_gb"])]
        rows.append(row + ([num(c.get("peak_gpu_gb"))] if gpu else []))
    ratio_rows = [[r["preftune"], r["trl"], num(r["pairs_per_second"], 1, "x"), num(r["tokens_per_second"], 1, "x")]
                  for r in m.get("ratios", []) if r["preftune"] in RATIO_ROWS]
    setting = (f"Model `{m['model']}`, {m['dtype']} weights, {m['device']}, {m['threads']} threads, "
               f"{m['batch_size']} pairs per step, max length {m['max_length']}, {m['pairs']} pairs; "
               f"measured matmul peak {num(m['matmul_peak_gflops'], 1)} GFLOP/s.")
    out = [setting, with_hardware(header, rows, hw)]
    if ratio_rows:
        out.append(with_hardware(["preftune row", "vs TRL row", "pairs/s ratio", "tokens/s ratio"], ratio_rows, hw, 2))
    return out


def recipe_accuracy(row: dict | None) -> dict | None:
    """A recipe row's accuracy as ``{value, low, high, pairs}``: stored so in older results, or as the recipe's
    metrics.json writes it (``accuracy`` a number beside ``accuracy_low`` / ``accuracy_high`` / ``pairs``)."""
    if not row or isinstance(row.get("accuracy"), dict) or row.get("accuracy") is None:
        return None if not row else row.get("accuracy")
    return {"value": row["accuracy"], "low": row.get("accuracy_low"), "high": row.get("accuracy_high"),
            "pairs": row.get("pairs")}


def recipe_variant_row(v: dict, label: str | None = None) -> list[str]:
    v = {**v, "accuracy": recipe_accuracy(v)}
    minutes = None if v.get("train_seconds") is None else v["train_seconds"] / 60
    kl = "-" if v.get("kl") is None else f"{v['kl']:.2f} ± {v['kl_stderr']:.2f}"
    return [label or v["name"], str(v.get("steps") or "-"), interval(v.get("accuracy")), win_text(v.get("win_rate")),
            kl, "-" if v.get("nll_difference") is None else f"{v['nll_difference']:+.3f}", num(minutes, 1)]


def recipe_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    a, b = m["task_a"], m["task_b"]
    if isinstance(a.get("kl"), dict):  # the recipe's metrics.json: {"mean", "stderr", "samples"}
        a = {**a, "kl": a["kl"]["mean"], "kl_stderr": a["kl"]["stderr"]}
    b = {"reward_model_accuracy": recipe_accuracy(b.get("reward_model")),
         "base_raw_accuracy": recipe_accuracy(b.get("base_raw")),
         **({"dpo_whole_part": b["dpo"]} if b.get("dpo") else {}), **b}  # older results: the keys below
    task_a = [["judge score, mean (-1..1)", num(a["base"]["mean_score"]), num(a["dpo"]["mean_score"])],
              ["positive / negative replies", f"{pct(a['base']['positive'])} / {pct(a['base']['negative'])}",
               f"{pct(a['dpo']['positive'])} / {pct(a['dpo']['negative'])}"],
              ["win rate vs base [95% CI]", "", win_text(a["win_rate"])],
              ["KL(DPO ‖ base), nats/reply", "", f"{a['kl']:.1f} ± {a['kl_stderr']:.1f}"],
              ["held-out preference accuracy", "", num(a["preference_accuracy"], 3)]]
    header = ["model", "steps", "held-out accuracy [95% CI]", "win rate vs base [95% CI] (w / l / t)",
              "KL nats/reply", "NLL/token vs base", "train min"]
    rows = [["reward model", "", interval(b["reward_model_accuracy"]), "", "", "", ""],
            ["base (raw log-prob preference)", "", interval(b["base_raw_accuracy"]), "", "", "", ""]]
    if "dpo_whole_part" in b:
        rows.append(recipe_variant_row(b["dpo_whole_part"], "**dpo (whole part)**, the task's result"))
    rows += [recipe_variant_row(v) for v in b.get("variants", [])]
    rows += [recipe_variant_row(v, v["name"] + " (added after the run)") for v in b.get("added_after_run", [])]
    if "dpo_judged_on_240_prompts" in b:
        rows.append(recipe_variant_row(b["dpo_judged_on_240_prompts"], "dpo judged on 240 prompts (after the run)"))
    summary = f"Exit status {m.get('exit_status', '-')}"
    if m.get("targets"):
        summary += f"; {sum(t['reached'] for t in m['targets'])} of {len(m['targets'])} targets reached"
    if m.get("seconds"):
        summary += f"; stage times summed: {m['seconds'] / 60:.0f} min"
    summary += "."
    out = [summary, "Task A (controlled sentiment):", with_hardware(["", "base", "DPO"], task_a, hw),
           "Task B (HH-RLHF harmless, reward-model judge):", with_hardware(header, rows, hw)]
    if m.get("stage_seconds") and m.get("seconds") and all(v is not None for v in m["stage_seconds"].values()):
        stages = [[name, f"{seconds / 60:.1f}"] for name, seconds in m["stage_seconds"].items()]
        out += ["Stage times:", with_hardware(["stage", "minutes"], stages + [["total", f"{m['seconds'] / 60:.1f}"]],
                                              hw)]
    return out


def precision_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    ev = m["eval"]
    rows = [["per-step loss, mean / max abs difference",
             f"{m['loss_abs_diff_mean']:.4f} / {m['loss_abs_diff_max']:.3f}", "-"],
            ["fp32's mean step-to-step loss change", "-", num(m["fp32_loss_step_to_step_mean"], 3)]]
    for step in sorted(ev["default"], key=int):
        rows.append([f"held-out loss / accuracy at step {step}",
                     f"{ev['default'][step]['loss']:.4f} / {ev['default'][step]['accuracy']:.2f}",
                     f"{ev['fp32'][step]['loss']:.4f} / {ev['fp32'][step]['accuracy']:.2f}"])
    rows.append(["share of weights moved", pct(m["weights_moved_share"]["default"], 2),
                 pct(m["weights_moved_share"]["fp32"], 2)])
    rows.append(["final weights, max abs difference", f"{m['final_weights_max_abs_diff']:.1e}", ""])
    return [with_hardware(["", "defaults (bf16 autocast)", "--mixed-precision no (fp32)"], rows, hw)]


def full_epoch_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    curve = m["held_out_accuracy_curve"]
    steps = sorted(curve, key=int)
    ev = m["evaluation"]
    rows = [["held-out accuracy"] + [num(curve[s], 3) for s in steps]]
    line = (f"Evaluation of the final model: held-out accuracy {num(ev['accuracy'], 3)} "
            f"on {ev['accuracy_pairs']} pairs, "
            f"win rate vs base {win_text(ev['win_rate'])}, KL {num(ev['kl'])}.")
    return [with_hardware(["step"] + steps, rows, hw), line]


def eval_stages_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    columns = list(m["seconds"])
    stages = []
    for col in columns:
        stages += [s for s in m["seconds"][col] if s not in stages and s != "total"]
    rows = [[s] + [num(m["seconds"][c].get(s), 1) for c in columns] for s in stages + ["total"]]
    return [with_hardware(["stage (seconds)"] + columns, rows, hw)]


def gpu_checks_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    rows = [[r["run"], r["distributed"], *(num(x, 1) for x in r["pairs_per_second_by_window"]), num(r["peak_gpu_gib"])]
            for r in m["fsdp_one_gpu"]]
    header = ["run", "distributed", "pairs/s steps 1-10", "11-20", "21-30", "31-40", "peak GPU GiB"]
    other = [[r["run"], r["reference"], num(r["pairs_per_second_steps_11_20"], 1), num(r["peak_gpu_gib"]),
              num(r["final_loss"], 4)] for r in m["fsdp_other"]]
    resume = m["fsdp_resume"]
    line = (f"FSDP checkpoint, kill and resume: max |weight difference| to an uninterrupted run "
            f"{resume['resumed_vs_uninterrupted_max_abs_diff']}, between two uninterrupted runs "
            f"{resume['uninterrupted_vs_uninterrupted_max_abs_diff']}.")
    return [with_hardware(header, rows, hw),
            with_hardware(["run", "reference", "pairs/s steps 11-20", "peak GPU GiB", "final loss"], other, hw), line]


def memory_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    rows = [[c["configuration"], num(c["peak_rss_gb"]), num(c["vs_frozen_copy"], 2, "x")] for c in m["configurations"]]
    return [with_hardware(["configuration", "peak RSS GB", "vs DPO with a frozen copy"], rows, hw)]


def quickstart_tables(result: dict) -> list[str]:
    m, hw = result["metrics"], result["hardware"]
    sft, dpo = m["sft"], m["dpo"]
    rows = [["judge score, mean (-1..1)", f"{sft['judge_score_mean']:+.2f}", f"{dpo['judge_score_mean']:+.2f}"],
            ["positive / negative reviews", f"{pct(m['sft']['positive'])} / {pct(m['sft']['negative'])}",
             f"{pct(m['dpo']['positive'])} / {pct(m['dpo']['negative'])}"],
            ["win rate vs SFT [95% CI]", "", win_text(m["win_rate"])],
            ["KL(DPO ‖ SFT), nats/review", "", f"{m['kl']:.1f} ± {m['kl_stderr']:.1f}"],
            ["held-out preference accuracy", "", num(m["preference_accuracy"])],
            ["wall time", "", f"{m['wall_seconds']} s"]]
    return [with_hardware(["", "SFT", "DPO"], rows, hw)]


def generic_tables(result: dict) -> list[str]:
    """Any kind without its own renderer: its scalar metrics, one per row."""
    rows = [[k, str(v)] for k, v in sorted(result["metrics"].items()) if isinstance(v, (int, float, str, bool))]
    return [with_hardware(["metric", "value"], rows, result["hardware"])] if rows else []


def sampler_tables(result: dict) -> list[str]:
    """The sampling benchmark: tokens/s per batch size and contender, the ratio to ``generate`` and the share
    of the measured roofline."""
    m = result["metrics"]
    rows = []
    for row in m["rows"]:
        for name, c in row["contenders"].items():
            ratio = row["speedup_vs_generate"][name]
            rows.append([str(row["batch"]), name, f"{c['tokens_per_s']:.1f}", f"{ratio:.2f}x",
                         f"{c['share_of_roofline']:.0%}", f"{row['roofline_tokens_per_s']:.0f}"])
    roof = m["roofline"]
    lines = [with_hardware(["batch", "sampler", "tokens/s", "vs generate", "of roofline", "roofline tokens/s"], rows,
                           result["hardware"]),
             f"Roofline: bf16 matmul {roof['bf16_matmul_flops']:.0f} GFLOP/s, memory {roof['memory_bytes_per_s']:.1f} "
             f"GB/s ({m['threads']} threads); {m['parameters']:,} parameters, up to {m['max_new_tokens']} new tokens."]
    return lines


def allocator_tables(result: dict) -> list[str]:
    """The allocator benchmark: seconds per training step per mode (each run and the mean, the ratio to
    glibc's defaults), and the evaluation's stage seconds per mode."""
    m = result["metrics"]
    rows = [[mode, " / ".join(f"{r['s_per_step']:.3f}" for r in runs), f"{m['train_s_per_step'][mode]:.3f}",
             f"{m['train_vs_system'][mode]:.2f}x"] for mode, runs in m["train_runs"].items()]
    lines = [with_hardware(["allocator", f"s/step, each run ({m['steps']} steps, first left out)", "mean",
                            "speed vs system"], rows, result["hardware"])]
    evals = {mode: runs for mode, runs in m.get("eval_runs", {}).items() if runs}
    if evals:
        stages = list(next(iter(evals.values()))[0]["seconds"])
        rows = [[stage, *(f"{statistics.mean(r['seconds'][stage] for r in runs):.1f}" for runs in evals.values())]
                for stage in stages]
        lines.append(with_hardware(["evaluation stage (s)", *evals], rows, result["hardware"]))
    return lines


def task_a_groups_tables(result: dict) -> list[str]:
    """Task A of the real recipe: DPO on best-vs-worst pairs against DPO on whole response groups."""
    a = result["metrics"]["task_a"]
    runs = (a["best_vs_worst"], a["groups"])

    def wr(r):
        w = r["win_rate"]
        return f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] ({w['wins']} / {w['losses']} / {w['ties']})"

    rows = [["training data", f"{a['train_pairs']} pairs", f"{a['train_groups']} groups ({a['group_ordered_pairs']} "
                                                           "ordered pairs)"],
            ["steps", str(a["steps"]), str(a["steps"])],
            [f"judge score (base {a['base']['judge_score_mean']:+.3f})",
             *(f"{r['judge_score_mean']:+.3f}" for r in runs)],
            ["positive / negative", *(f"{r['positive']:.0%} / {r['negative']:.0%}" for r in runs)],
            ["win rate vs base [95% CI]", *(wr(r) for r in runs)],
            ["KL to base, nats/review", *(f"{r['kl']:.1f} ± {r['kl_stderr']:.1f}" for r in runs)],
            ["held-out preference accuracy", *(f"{r['preference_accuracy']:.3f}" for r in runs)]]
    return [with_hardware(["", "DPO, best vs worst", "DPO, whole groups"], rows, result["hardware"])]


def task_a_iterative_tables(result: dict) -> list[str]:
    """Task A of the real recipe: on-policy rounds (``preftune iterate``) against offline DPO on the same
    number of judged samples and steps."""
    m = result["metrics"]
    offline, it = m["offline"], m["iterative"]

    def wr(w):
        return f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]" if w else ""

    rows = [[f"0 (base, the rounds' {it['eval_prompts']} prompts)", f"{it['base_judge_score']:+.3f}", "", "", "", "",
             "", ""],
            [f"offline DPO ({offline['judged_samples']} base samples, {offline['steps']} steps; its "
             f"{offline['eval_prompts']} evaluation prompts, base {offline['base_judge_score']:+.3f} there)",
             f"{offline['judge_score']:+.3f}", wr(offline["win_rate"]), "",
             f"{offline['kl']:.1f}", f"{offline['preference_accuracy']:.3f}", "", ""]]
    for r in it["rounds"]:
        rows.append([f"round {r['round']} ({r['pairs']} pairs, {r['steps']} steps)", f"{r['judge_score']:+.3f}",
                     wr(r["win_vs_base"]), wr(r["win_vs_previous"]), f"{r['kl']:.1f}",
                     f"{r['preference_accuracy']:.3f}", f"{r['nll_difference']:+.3f}", f"{r['seconds']:.0f}"])
    rows.append([f"last round vs offline DPO (n = {it['win_vs_offline']['n']})", "", wr(it["win_vs_offline"]), "",
                 "", "", "", ""])
    return [with_hardware(["model", "judge score", "win rate vs base [95% CI]", "vs previous round",
                           "KL to base (nats)", "held-out pair accuracy", "NLL - base's (nats/token)",
                           "seconds"], rows, result["hardware"])]


def throughput_kind(title: str) -> tuple[str, str, object]:
    return (title, "`benchmarks/dpo_throughput.py`: DPO training throughput, preftune against TRL 1.16 "
                   "(see [benchmarks/README.md](../benchmarks/README.md) for the method and fairness notes).",
            throughput_tables)


# kind -> (section title, what it measures, renderer); sections appear in this order, unknown kinds after
KINDS = {
    "quickstart-offline": ("Offline quickstart", "`preftune quickstart` (`make demo`): SFT, on-policy pairs and DPO "
                           "on a generated film-review world; seed 0.", quickstart_tables),
    "real-recipe": ("Real-model recipe", "`preftune quickstart --real` (`make real`): SmolLM2-135M-Instruct on "
                    "controlled sentiment (Task A) and HH-RLHF harmless (Task B).", recipe_tables),
    "dpo-full-epoch": ("DPO on the whole Task B DPO part", "`preftune train` of the recipe's Task B DPO settings on "
                       "all of the DPO part, held-out accuracy along the way.", full_epoch_tables),
    "dpo-throughput-smollm2-cpu": throughput_kind("DPO throughput: SmolLM2-135M on CPU"),
    "dpo-throughput-tiny-bench-cpu": throughput_kind("DPO throughput: tiny-bench model on CPU"),
    "dpo-throughput-0.5b-cuda": throughput_kind("DPO throughput: 0.5B model on a GPU"),
    "precision-curve": ("Precision: bf16 autocast against fp32", "`benchmarks/precision_curve.py`: the same 50 DPO "
                        "steps with the default precision and with `--mixed-precision no`.", precision_tables),
    "memory-reference": ("Peak memory by reference mode", "`benchmarks/memory_reference.py`: peak RSS of two DPO "
                         "steps with each way of providing the reference.", memory_tables),
    "eval-stages": ("Evaluation time by stage", "`benchmarks/eval_stages.py`: seconds per stage of one sweep "
                    "variant's evaluation.", eval_stages_tables),
    "gpu-checks": ("GPU checks", "`benchmarks/gpu_checks.sh`: FSDP2 on one GPU, resume under FSDP, LoRA and a live "
                   "reference.", gpu_checks_tables),
    "gguf-export": ("GGUF export checked by llama.cpp", "`benchmarks/gguf_export.py`: SmolLM2-135M-Instruct tuned by "
                    "preftune, exported per quantization, run by llama.cpp against transformers.", generic_tables),
    "task-a-groups": ("Task A: best-vs-worst pairs against whole response groups", "`preftune quickstart --real`'s "
                      "Task A (SmolLM2-135M-Instruct, controlled sentiment): the same samples trained as best-vs-worst "
                      "pairs and as groups of 4, same steps, judged against the same base samples.",
                      task_a_groups_tables),
    "task-a-iterative": ("Task A: on-policy rounds against offline DPO", "`preftune quickstart --real`'s iterative "
                         "stage (SmolLM2-135M-Instruct, controlled sentiment): `preftune iterate`, 3 rounds of 64 "
                         "fresh films x 4 samples from the current policy, DPO from it (reference: the previous "
                         "round), against the offline best-vs-worst DPO on 192 films x 4 base samples: the same "
                         "768 judged samples and 24 steps; held-out films only.", task_a_iterative_tables),
    "sampling": ("Sampling speed", "`benchmarks/bench_sampler.py`: SmolLM2-135M-Instruct, chat prompts, temperature 1; "
                 "preftune's sampler against Hugging Face `generate` (bf16 weights) and llama.cpp, same prompts and "
                 "batches in one process.", sampler_tables),
    "allocator": ("The command's allocator settings", "`benchmarks/bench_allocator.py`: `preftune train` steps "
                  "(SmolLM2-135M-Instruct, the real recipe's sweep dpo settings) and one sweep variant's evaluation "
                  "with glibc's defaults (`system`), with the settings the `preftune` command applies at start "
                  "(`command`), and with them in the environment from the process's start (`environment`).",
                  allocator_tables),
    "groups": ("Response groups vs expanded pairs", "`benchmarks/bench_groups.py`: SmolLM2-135M-Instruct's own groups "
               "of 4 sampled responses, DPO in one forward per group against the same groups expanded into their 6 "
               "pairs (preftune and TRL 1.16); ratios are group / expanded.", generic_tables),
}


# ---- the page

def run_line(folder: str, result: dict) -> str:
    """One older run: date, name, hardware and a link to its results.json."""
    return (f"- {result['date']}: {result['name']} — {hardware_label(result['hardware'])} — "
            f"[`{folder}`](../benchmarks/results/{folder}/results.json)")


def section(kind: str, runs: list[tuple[str, dict]]) -> str:
    """The Markdown of one kind: the latest run's tables, then the older runs."""
    title, about, render = KINDS.get(kind, (kind, "", generic_tables))
    runs = sorted(runs, key=lambda run: (run[1]["date"], run[0]), reverse=True)
    folder, latest = max(runs, key=lambda run: (not run[1].get("partial", False), run[1]["date"], run[0]))
    older = [run for run in runs if run[0] != folder]
    source = (f"Latest: **{latest['name']}**, {latest['date']}, commit `{latest['commit'] or 'not recorded'}`, "
              f"{hardware_label(latest['hardware'])}; versions: {versions_label(latest['versions'])}. "
              f"Data: [`{folder}/results.json`](../benchmarks/results/{folder}/results.json).")
    command = "Command: " + "; ".join(f"`{c}`" for c in latest["command"]) + "."
    parts = [f"## {title}", about, source, command, *render(latest)]
    if latest.get("notes"):
        parts.append(f"Notes: {latest['notes']}")
    if older:
        parts.append("Older runs:\n\n" + "\n".join(run_line(f, r) for f, r in older))
    return "\n\n".join(p for p in parts if p)


def render(results: list[tuple[str, dict]]) -> str:
    """docs/results.md for these ``(folder, results.json)`` pairs."""
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for folder, data in results:
        by_kind.setdefault(data["kind"], []).append((folder, data))
    order = [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS)
    head = ("# Benchmark results\n\n"
            f"Generated by `{COMMAND}` from every `benchmarks/results/*/results.json`; do not edit by hand. "
            "Each section shows the latest run of one benchmark, every row naming the hardware it ran on, "
            "then the older runs. How each benchmark is run and what it measures: "
            "[benchmarks/README.md](../benchmarks/README.md); the history of the measurements: "
            "[benchmarks/results/LOG.md](../benchmarks/results/LOG.md).\n\n"
            + "\n".join(f"- [{KINDS.get(k, (k,))[0]}](#{slug(KINDS.get(k, (k,))[0])})" for k in order))
    return head + "\n\n" + "\n\n".join(section(k, by_kind[k]) for k in order) + "\n"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be generated")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result folders")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    args = parser.parse_args(argv)
    try:
        text = render(load_results(args.results))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
