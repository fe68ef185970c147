"""The real recipe's targets and report (:mod:`preftune.recipes.real`): which target each run reached,
``metrics.json`` (written after every stage, atomically) and ``report.md`` with both tasks' tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.common.text import duration

if TYPE_CHECKING:
    from preftune.recipes.real import RealRecipeConfig

def check_targets(cfg: "RealRecipeConfig", metrics: dict) -> list[dict]:
    """Each target with its value and whether it is reached (a missing number is not reached)."""
    a_win = metrics["task_a"]["win_rate"]
    main = metrics["task_b"].get("dpo") or {}  # the whole-part DPO run (the sweep's variants stop earlier)
    b_win = main.get("win_rate") or {}
    accuracy, pairs = main.get("accuracy"), main.get("pairs") or 0
    return [
        {"name": "task A: DPO win rate over the base (sentiment judge)",
         "target": f">= {cfg.target_a_win_rate} with 95% CI low > 0.5", "value": _rate_text(a_win),
         "reached": a_win["rate"] >= cfg.target_a_win_rate and a_win["low"] > 0.5},
        {"name": "task B: DPO held-out preference accuracy",
         "target": f">= {cfg.target_b_accuracy} on >= {cfg.target_b_accuracy_pairs} pairs",
         "value": "n/a" if accuracy is None else f"{accuracy:.3f} on {pairs} pairs",
         "reached": (accuracy is not None and accuracy >= cfg.target_b_accuracy
                     and pairs >= cfg.target_b_accuracy_pairs)},
        {"name": "task B: DPO win rate over the base (reward-model judge)",
         "target": f">= {cfg.target_b_win_rate} with 95% CI low > 0.5", "value": _rate_text(b_win),
         "reached": bool(b_win) and b_win["rate"] >= cfg.target_b_win_rate and b_win["low"] > 0.5},
    ]


def write_metrics(out: Path, metrics: dict) -> None:
    from preftune.evaluation.evaluate import to_json

    tmp = out / "metrics.json.tmp"
    tmp.write_text(to_json(metrics))
    os.replace(tmp, out / "metrics.json")


def _rate_text(rate: dict | None) -> str:
    if not rate:
        return "n/a"
    return f"{rate['rate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] (n={rate['n']})"


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def task_a_rows(a: dict) -> list[tuple[str, str, str]]:
    """``(metric, base, DPO)`` rows of Task A."""
    base, dpo, kl = a["base"], a["dpo"], a["kl"]
    return [("judge score, mean (-1..1)", f"{base['mean_score']:+.3f}", f"{dpo['mean_score']:+.3f}"),
            ("positive / negative / zero reviews", f"{base['positive']:.0%} / {base['negative']:.0%} / "
             f"{base['zero']:.0%}", f"{dpo['positive']:.0%} / {dpo['negative']:.0%} / {dpo['zero']:.0%}"),
            ("words per review", f"{base['mean_words']:.1f}", f"{dpo['mean_words']:.1f}"),
            ("win rate vs base [95% CI]", "", _rate_text(a["win_rate"])),
            ("KL(DPO || base), nats/review", "", f"{_num(kl['mean'], '.2f')} +- {_num(kl['stderr'], '.2f')}"),
            ("held-out preference accuracy", "", _num(a["preference_accuracy"]))]


TASK_B_HEADER = ("model", "training steps", "held-out accuracy", "win rate vs base [95% CI]", "KL (nats/reply)",
                 "NLL difference")


def task_b_rows(b: dict) -> list[tuple[str, ...]]:
    """:data:`TASK_B_HEADER` rows of Task B: the reward model and the base's raw preference, the
    whole-part DPO (the task's result, when its stage has run), then the sweep's variants."""
    rows = [(name, "", f"{part['accuracy']:.3f} [{part['accuracy_low']:.3f}, {part['accuracy_high']:.3f}] "
                       f"(n={part['pairs']})", "", "", "")
            for name, part in (("reward model (Bradley-Terry reward)", b["reward_model"]),
                               ("base (raw log-prob preference)", b["base_raw"]))]
    for v in ([b["dpo"]] if b.get("dpo") else []) + b.get("variants", []):
        steps = "" if v.get("steps") is None else str(v["steps"])
        if v.get("error"):
            rows.append((v["name"], steps, f"failed: {v['error']}", "", "", ""))
            continue
        kl = _num(v["kl"], ".2f") + (f" +- {v['kl_stderr']:.2f}" if v.get("kl_stderr") is not None else "")
        accuracy = (f"{v['accuracy']:.3f} [{v['accuracy_low']:.3f}, {v['accuracy_high']:.3f}] (n={v['pairs']})"
                    if v.get("accuracy") is not None else "n/a")
        rows.append((v["name"], steps, accuracy, _rate_text(v["win_rate"]), kl, _num(v["nll_difference"], "+.3f")))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def write_report(out: Path, metrics: dict) -> None:
    """``report.md``: the two tasks' tables, sample generations, the frontier plot, targets, timings."""
    cfg, a, b = metrics["config"], metrics["task_a"], metrics["task_b"]
    lines = ["# preftune real recipe", "", f"Base model: `{metrics['model']}`. Every number below is on held-out "
             "data no training stage saw.", "", "## Task A: controlled sentiment (DPO paper, section 6.1)", "",
             f"{a['train_pairs']} on-policy pairs (best vs worst of {cfg['a_samples_per_prompt']} base samples for "
             f"each of {a['train_films']} films, judge `{a['judge']}`; {a['skipped_ties']} films all tied), DPO beta "
             f"{cfg['a_beta']}, lr {cfg['a_learning_rate']}. Evaluated on {a['eval_prompts']} prompts over "
             f"{a['held_out_films']} held-out films: one DPO and one base sample each, compared by the judge (ties "
             "count half; Wilson interval).", ""]
    lines += _table(("metric", "base", "DPO"), task_a_rows(a))
    lines += ["", "Sample generations (first sample of the first held-out films, not cherry-picked):", ""]
    for row in a["examples"]:
        lines += [f"**{row['prompt']}**", "", f"* base ({row['base_score']:+.2f}): {row['base']}",
                  f"* DPO ({row['dpo_score']:+.2f}): {row['dpo']}", ""]
    sizes = b["data"]["rows"]
    lines += ["## Task B: HH-RLHF harmless", "",
              f"`{b['data']['source']}` as chat messages, split by prompt: held-out {sizes['held_out']}, reward-model "
              f"part {sizes['rm']}, DPO part {sizes['dpo']} pairs. Accuracy: how often the chosen reply of a held-out "
              "pair gets the higher reward (the variants' implicit reward beta * (logp - logp_base)). Win rate: "
              f"each variant's sample vs the base's for {cfg['b_eval_prompts']} held-out prompts, judged by the "
              "reward model. NLL difference: per token on the held-out chosen replies, variant - base. "
              "`dpo (whole part)` is the task's DPO result, trained on the whole DPO part; the sweep's variants "
              "below it share one shorter budget" + (f" ({cfg['b_max_steps']} steps)" if cfg.get("b_max_steps")
                                                    else "") + ", to compare methods.", ""]
    lines += _table(TASK_B_HEADER, task_b_rows(b))
    lines += ["", "![reward vs KL](b_sweep/frontier.png)", "", "The sweep's own report: `b_sweep/report.md`.", "",
              "## Targets", ""]
    lines += [f"* **{'reached' if t['reached'] else 'not reached'}** — {t['name']}: {t['value']} (target "
              f"{t['target']})" for t in metrics["targets"]]
    lines += ["", "## Wall time", ""]
    lines += _table(("stage", "seconds"), [(name, f"{s:.0f}") for name, s in metrics["stage_seconds"].items()])
    lines += [f"| total | {metrics['seconds']:.0f} |"]
    if metrics.get("resumed"):
        lines += ["", "Kept from an earlier run into this folder (`--resume`, same settings): "
                  f"{', '.join(metrics['resumed'])}; their seconds are the earlier run's, and the total adds them "
                  "to this run's."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def summary_text(out: Path, metrics: dict) -> str:
    lines = ["", "task A (sentiment):"]
    lines += [f"  {name:<36} {base:>18}  {dpo}" for name, base, dpo in task_a_rows(metrics["task_a"])]
    lines += ["task B (HH-RLHF harmless): " + ", ".join(TASK_B_HEADER)]
    lines += ["  " + " | ".join(row) for row in task_b_rows(metrics["task_b"])]
    lines += [f"{'reached' if t['reached'] else 'NOT reached'}: {t['name']}: {t['value']} (target {t['target']})"
              for t in metrics["targets"]]
    verdict = "PASS" if metrics["passed"] else "FAIL"
    lines.append(f"{verdict}: {sum(t['reached'] for t in metrics['targets'])}/{len(metrics['targets'])} targets; "
                 f"{duration(metrics['seconds'])}; report: {out / 'report.md'}")
    return "\n".join(lines)
