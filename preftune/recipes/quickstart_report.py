"""The offline quickstart's report (:mod:`preftune.recipes.quickstart`): the summary printed at the end,
``report.md`` and its two plots, from the run's metrics and held-out samples (plain values)."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.recipes.stages import (
    aligned_rows,
    example_samples,
    interval_text,
    markdown_table,
    sample_lines,
    verdict_line,
)

SAMPLE_SIDES = [("SFT", "sft"), ("DPO", "dpo")]  # (label, key) of the sample lines in the summary and report


def summary_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """``(metric, SFT, DPO)`` rows shared by the printed summary and ``report.md``."""
    sft, dpo, win, kl = metrics["sft"], metrics["dpo"], metrics["win_rate"], metrics["kl"]
    accuracy = metrics["preference_accuracy"]["after"]
    return [
        ("judge score, mean (-1..1)", f"{sft['mean_score']:+.3f}", f"{dpo['mean_score']:+.3f}"),
        ("positive / negative reviews", f"{sft['positive']:.0%} / {sft['negative']:.0%}",
         f"{dpo['positive']:.0%} / {dpo['negative']:.0%}"),
        ("words per review", f"{sft['mean_words']:.1f}", f"{dpo['mean_words']:.1f}"),
        ("win rate vs SFT [95% CI]", "",
         f"{interval_text(win['rate'], win['low'], win['high'])}  n={win['n']}: {win['wins']} wins, "
         f"{win['losses']} losses, {win['ties']} ties"),
        ("KL(DPO || SFT), nats/review", "", f"{kl['mean']:.2f} +- {kl['stderr']:.2f}"),
        ("held-out preference accuracy", "", "n/a" if accuracy is None else f"{accuracy:.2f}"),
    ]


def summary_text(out: Path, metrics: dict, samples: list[dict], n_examples: int = 3) -> str:
    """The summary printed at the end: the table of :func:`summary_rows`, sample generations, the verdict."""
    rows = summary_rows(metrics)
    width = max(len(row[0]) for row in rows)
    lines = [f"\nheld-out films: {metrics['held_out_films']}, judge: {metrics['judge']}"]
    lines += aligned_rows([("", "SFT", "DPO"), *rows], name_width=width + 2, value_width=9)
    lines.append("\nsample generations on held-out films, SFT -> DPO [judge score]:")
    lines += sample_lines(example_samples(samples, n_examples), SAMPLE_SIDES, markdown=False)
    lines.append("\n" + verdict_line(metrics["passed"], f"win rate {metrics['win_rate']['rate']:.3f} (target >= "
                                     f"{metrics['config']['min_win_rate']})",
                                     f"{metrics['seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU)",
                                     out / "report.md"))
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, samples: list[dict]) -> None:
    """``report.md``: what ran, the summary table, the plots, sample generations, the files."""
    cfg = metrics["config"]
    lines = ["# preftune quickstart", "",
             "A tiny Llama pretrained on generated film reviews, SFT'd to write reviews of both sentiments, "
             "then trained with DPO on its own samples ranked by a lexicon sentiment judge "
             f"(`{metrics['judge']}`). Evaluated on {metrics['held_out_films']} films no stage saw.", ""]
    lines += markdown_table(("metric", "SFT", "DPO"), summary_rows(metrics))
    lines += ["", f"{metrics['pairs']} training pairs ({metrics['skipped_ties']} prompts skipped: all samples "
              f"tied), beta {cfg['beta']}, {metrics['seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU).", "",
              f"* **Win rate**: for each of {metrics['held_out_prompts']} held-out prompts ({cfg['eval_samples']} "
              "per film) one DPO and one SFT sample, compared by the judge; ties count half; Wilson interval.",
              "* **KL**: Monte-Carlo KL(DPO || SFT) on DPO samples, nats per review, with its standard error.",
              "* **Preference accuracy**: how often the DPO implicit reward ranks the chosen review of a held-out "
              "pair (best vs worst SFT sample of a held-out film) above the rejected one.", "",
              "![judge scores](judge_scores.png)", "", "![DPO training](dpo_training.png)", "",
              "## Sample generations (first sample of the first held-out films, not cherry-picked)", ""]
    lines += sample_lines(example_samples(samples, 6), SAMPLE_SIDES, markdown=True)
    lines += ["## Files", "", "| path | what |", "|---|---|",
              "| `base/`, `sft/`, `dpo/` | the three models (`from_pretrained`), each with its `metrics.jsonl` |",
              "| `data/` | `pretrain.jsonl`, `sft.jsonl`, `pairs.jsonl` (train), `eval_pairs.jsonl` (held-out) |",
              "| `samples.jsonl` | every held-out prompt with its SFT and DPO sample and their scores |",
              "| `metrics.json` | every number above, the stage timings and the configuration |"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(figsize=(6.4, 3.6), dpi=100)


def plot_scores(path: Path, sft_scores: list[float], dpo_scores: list[float]) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    bins = [i / 10 for i in range(-10, 11)]
    ax.hist(sft_scores, bins=bins, alpha=0.6, label="SFT")
    ax.hist(dpo_scores, bins=bins, alpha=0.6, label="DPO")
    ax.set(xlabel="judge score (lexicon sentiment)", ylabel="held-out samples", title="judge scores, held-out films")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_training(path: Path, metrics_file: Path) -> None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]  # training rows (eval rows have eval/ keys only)
    fig = _figure()
    ax = fig.add_subplot()
    steps = [row["step"] for row in rows]
    for key, label in (("loss", "loss"), ("rewards/accuracies", "reward accuracy"),
                       ("rewards/margins", "reward margin")):
        ax.plot(steps, [row[key] for row in rows], label=label)
    ax.set(xlabel="DPO step", title="DPO training (training batches)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
