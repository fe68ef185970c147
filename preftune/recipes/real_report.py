"""The real recipe's report (:mod:`preftune.recipes.real`): ``report.md`` and the printed summary, with both
tasks' tables and the targets, from the run's metrics (plain values: the ``metrics.json`` dict)."""

from __future__ import annotations

from pathlib import Path

from preftune.common.text import duration, number
from preftune.recipes.stages import (
    aligned_rows,
    interval_text,
    markdown_table,
    rate_text,
    sample_lines,
    verdict_line,
)


def task_a_rows(a: dict) -> list[tuple[str, ...]]:
    """``(metric, base, DPO)`` rows of Task A, with a fourth column (DPO on the response groups) when the
    group run's stage has run (``a["group"]``)."""
    runs = [a] + ([a["group"]] if a.get("group") else [])

    def row(name: str, base: str, value) -> tuple[str, ...]:
        return (name, base, *(value(run) for run in runs))

    def shares(side: dict) -> str:
        return f"{side['positive']:.0%} / {side['negative']:.0%} / {side['zero']:.0%}"

    base = a["base"]
    return [row("training steps", "", lambda run: number(run.get("steps"), "d")),
            row("judge score, mean (-1..1)", f"{base['mean_score']:+.3f}",
                lambda run: f"{run['dpo']['mean_score']:+.3f}"),
            row("positive / negative / zero reviews", shares(base), lambda run: shares(run["dpo"])),
            row("words per review", f"{base['mean_words']:.1f}", lambda run: f"{run['dpo']['mean_words']:.1f}"),
            row("win rate vs base [95% CI]", "", lambda run: rate_text(run["win_rate"])),
            row("KL(DPO || base), nats/review", "", lambda run: f"{number(run['kl']['mean'], '.2f')} +- "
                                                             f"{number(run['kl']['stderr'], '.2f')}"),
            row("held-out preference accuracy", "", lambda run: number(run["preference_accuracy"], ".3f"))]


ITERATIVE_HEADER = ("round", "judge score", "win rate vs base [95% CI]", "vs previous round", "KL to base",
                    "held-out accuracy", "pairs", "steps")


def iterative_rows(it: dict) -> list[tuple[str, ...]]:
    """:data:`ITERATIVE_HEADER` rows of Task A's on-policy rounds (round 0: the base)."""
    rows = [("0 (base)", number(it.get("base_judge_score"), "+.3f"), "", "", "", "", "", "")]
    for r in it["rounds"]:
        kl = number(r.get("kl"), ".2f") + (f" +- {r['kl_stderr']:.2f}" if r.get("kl_stderr") is not None else "")
        rows.append((str(r["round"]), number(r.get("judge_score"), "+.3f"), rate_text(r.get("win_vs_base") or {}),
                     rate_text(r.get("win_vs_previous") or {}), kl, number(r.get("preference_accuracy"), ".3f"),
                     number(r.get("pairs"), "d"), number(r.get("steps"), "d")))
    return rows


def iterative_lines(it: dict) -> list[str]:
    """The report's part on Task A's on-policy rounds: what ran, the rounds' table, the comparison."""
    lines = ["### On-policy rounds on the same budget", "",
             f"`preftune iterate`: {len(it['rounds'])} rounds, each sampling {it['prompts_per_round']} fresh training "
             f"films from the current policy (round 1: the base), judged, best vs worst, DPO from the current policy "
             f"(reference: {it['reference']}); {it['judged_samples']} judged samples and {it['steps']} steps in all, "
             f"as the offline best-vs-worst run ({it['offline_judged_samples']} samples of the base, "
             f"{number(it.get('offline_steps'), 'd')} steps). Measured on {it['eval_prompts']} held-out prompts each "
             f"round (the run's own report: `{it['report']}`).", ""]
    lines += markdown_table(ITERATIVE_HEADER, iterative_rows(it))
    scores = f"{number(it.get('score_last'), '+.3f')} vs {number(it.get('score_offline'), '+.3f')}"
    lines += ["", f"The last round against the offline DPO model, one sample each on {it['versus_prompts']} held-out "
              f"prompts: win rate **{rate_text(it['win_vs_offline'])}** (judge score {scores}).", ""]
    return lines


def task_a_header(a: dict) -> tuple[str, ...]:
    """The columns of :func:`task_a_rows`."""
    return ("metric", "base", "DPO, best vs worst") + (("DPO, whole groups",) if a.get("group") else ())


TASK_B_HEADER = ("model", "training steps", "held-out accuracy", "win rate vs base [95% CI]", "KL (nats/reply)",
                 "NLL difference")


def task_b_rows(b: dict) -> list[tuple[str, ...]]:
    """:data:`TASK_B_HEADER` rows of Task B: the reward model and the base's raw preference, the
    whole-part DPO (the task's result, when its stage has run), then the sweep's variants."""
    rows = [(name, "", interval_text(part["accuracy"], part["accuracy_low"], part["accuracy_high"], part["pairs"]),
             "", "", "")
            for name, part in (("reward model (Bradley-Terry reward)", b["reward_model"]),
                               ("base (raw log-prob preference)", b["base_raw"]))]
    for v in ([b["dpo"]] if b.get("dpo") else []) + b.get("variants", []):
        steps = "" if v.get("steps") is None else str(v["steps"])
        if v.get("error"):
            rows.append((v["name"], steps, f"failed: {v['error']}", "", "", ""))
            continue
        kl = number(v["kl"], ".2f") + (f" +- {v['kl_stderr']:.2f}" if v.get("kl_stderr") is not None else "")
        accuracy = (interval_text(v["accuracy"], v["accuracy_low"], v["accuracy_high"], v["pairs"])
                    if v.get("accuracy") is not None else "n/a")
        rows.append((v["name"], steps, accuracy, rate_text(v["win_rate"]), kl, number(v["nll_difference"], "+.3f")))
    return rows


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
    if a.get("group"):
        lines += [f"The comparison: DPO on the same samples as {a['train_groups']} response groups (all "
                  f"{a['group_responses']} non-empty samples with their judge scores, {a['group_ordered_pairs']} "
                  "ordered pairs, one forward per group), with the best-vs-worst run's steps and settings, "
                  "against the same base samples.", ""]
    lines += markdown_table(task_a_header(a), task_a_rows(a))
    lines += ["", "Sample generations (first sample of the first held-out films, not cherry-picked):", ""]
    lines += sample_lines(a["examples"], [("base", "base"), ("DPO", "dpo")], markdown=True)
    if a.get("group"):
        lines += ["DPO on whole groups, the same prompts:", ""]
        lines += sample_lines(a["group"]["examples"], [("DPO, groups", "dpo")], markdown=True)
    if a.get("iterative"):
        lines += iterative_lines(a["iterative"])
    sizes = b["data"]["rows"]
    lines += ["## Task B: HH-RLHF harmless", "",
              f"`{b['data']['source']}` as chat messages, split by prompt: held-out {sizes['held_out']}, reward-model "
              f"part {sizes['rm']}, DPO part {sizes['dpo']} pairs. Accuracy: how often the chosen reply of a held-out "
              "pair gets the higher reward (the variants' implicit reward beta * (logp - logp_base)). Win rate: "
              f"each variant's sample vs the base's for {cfg['b_eval_prompts']} held-out prompts, judged by the "
              "reward model. NLL difference: per token on the held-out chosen replies, variant - base. "
              "`dpo (whole part)` is the task's DPO result, trained on the whole DPO part" + (
                  f" (the sweep's dpo, trained on the part's first {sizes['sweep']} pairs, continued on the other "
                  f"{sizes['dpo_rest']})" if sizes.get("sweep") and (b.get("dpo") or {}).get("continued_from") else "")
              + "; the sweep's variants below it share one shorter budget" + (
                  f" ({cfg['b_max_steps']} steps)" if cfg.get("b_max_steps") else "") + ", to compare methods.", ""]
    lines += markdown_table(TASK_B_HEADER, task_b_rows(b))
    lines += ["", "![reward vs KL](b_sweep/frontier.png)", "", "The sweep's own report: `b_sweep/report.md`.", "",
              "## Targets", ""]
    if metrics.get("smoke_checks") is not None:
        lines += ["A smoke run (`--reduced`): it passes when every check below holds. The targets are the full "
                  "run's; at this size they are shown for information, not judged.", ""]
        lines += [f"* **{'ok' if c['ok'] else 'FAILED'}** — {c['name']}" + (f": {c['detail']}" if c["detail"] else "")
                  for c in metrics["smoke_checks"]]
        lines += [""]
    lines += [f"* **{'reached' if t['reached'] else 'not reached'}** — {t['name']}: {t['value']} (target "
              f"{t['target']})" for t in metrics["targets"]]
    lines += ["", "## Wall time", ""]
    lines += markdown_table(("stage", "seconds"), [(name, f"{s:.0f}") for name, s in metrics["stage_seconds"].items()])
    lines += [f"| total | {metrics['seconds']:.0f} |"]
    if metrics.get("resumed"):
        lines += ["", "Kept from an earlier run into this folder (`--resume`, same settings): "
                  f"{', '.join(metrics['resumed'])}; their seconds are the earlier run's, and the total adds them "
                  "to this run's."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def summary_text(out: Path, metrics: dict) -> str:
    """The summary printed at the end: both tasks' tables, each target reached or not, the verdict."""
    lines = ["", "task A (sentiment):"]
    a = metrics["task_a"]
    lines += aligned_rows([(name, base, " | ".join(runs)) for name, base, *runs in
                           [task_a_header(a)] + task_a_rows(a)], name_width=37, value_width=18, indent="  ")
    if a.get("iterative"):
        lines += ["task A on-policy rounds: " + ", ".join(ITERATIVE_HEADER)]
        lines += ["  " + " | ".join(row) for row in iterative_rows(a["iterative"])]
        lines += [f"  last round vs offline DPO: {rate_text(a['iterative']['win_vs_offline'])}"]
    lines += ["task B (HH-RLHF harmless): " + ", ".join(TASK_B_HEADER)]
    lines += ["  " + " | ".join(row) for row in task_b_rows(metrics["task_b"])]
    lines += [f"{'reached' if t['reached'] else 'NOT reached'}: {t['name']}: {t['value']} (target {t['target']})"
              for t in metrics["targets"]]
    reached = f"{sum(t['reached'] for t in metrics['targets'])}/{len(metrics['targets'])} targets"
    checks = metrics.get("smoke_checks")
    if checks is not None:
        lines += [f"{'ok' if c['ok'] else 'FAILED'}: {c['name']}" + (f" ({c['detail']})" if c["detail"] else "")
                  for c in checks]
        reached = (f"smoke run, {sum(c['ok'] for c in checks)}/{len(checks)} checks (the targets apply to the "
                   f"full run: {reached} reached at this size)")
    lines.append(verdict_line(metrics["passed"], reached, duration(metrics["seconds"]), out / "report.md"))
    return "\n".join(lines)
