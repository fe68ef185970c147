"""``preftune iterate``'s measurements and report.

* :func:`measure_round` — a round's held-out numbers: judge score, win rate over the base and over the
  previous round (95% Wilson intervals), KL(round || base), and with ``eval_pairs`` the held-out preference
  accuracy and NLL regression (:func:`held_out_pairs`) -> ``round-n/round.json`` and ``eval_samples.jsonl``.
* :func:`write_outputs` — ``OUT/metrics.json``, ``OUT/report.md`` (one row per round) and ``OUT/iterate.svg``
  (judge score and win rates per round, drawn by hand: no plotting library needed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from preftune.common.files import json_safe, write_atomic
from preftune.recipes.stages import markdown_table, rate_text, write_metrics

EVAL_SEED_OFFSET = 7919  # the held-out samples' seed offset (the same every round: common random numbers)
STAGE_COLUMNS = ("sample", "judge", "pairs", "train", "measure")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines, atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path, default=None):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else default


# ------------------------------------------------------------------------------------------------ measuring


def measure_round(loop, n: int) -> int:
    """Measure round ``n``'s model (round 0: the starting model) on the held-out prompts; -> judge verdicts asked.

    ``loop``: the run (:class:`preftune.recipes.iterate._Loop`: its settings, folders, models and judge).
    """
    from preftune.evaluation.judges.base import ScoringJudge, compare_scores
    from preftune.evaluation.sampling import sample, sample_and_kl

    cfg, prompts, folder = loop.cfg, loop.eval_prompts, loop.folder(n)
    model, tokenizer = loop.load(loop.policy_path(n))
    compute = loop.compute_dtype(loop.policy_path(n))
    options = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   seed=cfg.seed * 1000 + EVAL_SEED_OFFSET, batch_size=cfg.sample_batch_size, compute_dtype=compute)
    if n == 0:
        texts = [row[0] for row in sample(model, tokenizer, prompts, n=1, **options)]
    else:  # the judged samples serve the KL too when they are the model's own distribution (one sampling)
        base_model, _ = loop.load(cfg.model)
        texts, (kl, stderr) = sample_and_kl(model, base_model, tokenizer, prompts, cfg.kl_samples,
                                            kl_seed=options["seed"] + 1, **options)
    judge = loop.cached(n)
    scores = judge.score(prompts, texts) if isinstance(judge, ScoringJudge) else None
    row: dict = {"round": n, "prompts": len(prompts),
                 "judge_score": sum(scores) / len(scores) if scores else None,
                 "positive": sum(s > 0 for s in scores) / len(scores) if scores else None}
    if n > 0:
        def win(other: int) -> dict:
            rows = read_jsonl(loop.folder(other) / "eval_samples.jsonl")
            if scores is not None:
                result = compare_scores(scores, [r["score"] for r in rows])
            else:
                result = judge.compare(prompts, texts, [r["response"] for r in rows])
            return dataclasses.asdict(result.win_rate())

        if cfg.eval_pairs:
            row["held_out_pairs"] = held_out_pairs(cfg, loop.policy_path(n))
        row.update(win_vs_base=win(0), win_vs_previous=win(n - 1),
                   kl={"mean": kl, "stderr": stderr, "samples": len(prompts) * cfg.kl_samples},
                   pairs=read_json(folder / "pairs.json", {}), train=training_numbers(folder))
    write_jsonl(folder / "eval_samples.jsonl",
                [{"prompt": p, "response": t, "score": s}
                 for p, t, s in zip(prompts, texts, scores or [None] * len(texts))])
    write_atomic(folder / "round.json", json.dumps(json_safe(row), indent=1))
    return judge.calls


# ------------------------------------------------------------------------------------------------ the report


def write_outputs(out: Path, measured: int, stopped: bool, runner, judge_calls: int) -> dict:
    """``metrics.json``, ``report.md`` and ``iterate.svg`` from the round folders -> the metrics."""
    rounds = []
    for n in range(1, measured + 1):
        row = read_json(out / f"round-{n}" / "round.json")
        row["stage_seconds"] = read_json(out / f"round-{n}" / "stages.json", {})
        rounds.append(row)
    base = read_json(out / "round-0" / "round.json")
    metrics = {"settings": read_json(out / "settings.json"), "base": base, "rounds": rounds, "stopped": stopped,
               "seconds": runner.total_seconds(), "judge_verdicts_this_run": judge_calls}
    write_metrics(out, metrics)
    write_atomic(out / "report.md", report_text(metrics))
    write_atomic(out / "iterate.svg", plot_svg(base, rounds))
    return metrics


def training_numbers(folder: Path) -> dict:
    """``train.json``'s steps and final metrics without the speeds and times (which vary run to run)."""
    summary = read_json(folder / "train.json", {})
    final = {k: v for k, v in summary.get("final", {}).items() if not any(w in k for w in ("second", "time", "mem"))}
    return {"steps": summary.get("steps"), "final": final}


def held_out_pairs(cfg, model: str) -> dict:
    """``preftune eval``'s preference accuracy and NLL regression of ``model`` against the start on
    ``cfg.eval_pairs`` (the training's beta and lengths) -> ``{"preference", "nll"}``. The start's log-probs
    of the pairs are computed once and read back in later rounds (``round-0/base_cache.json``)."""
    from preftune.config.eval_config import EvalConfig
    from preftune.evaluation.evaluate import evaluate_model

    train = cfg.train
    options = {"model": model, "ref_model": cfg.model, "data": cfg.eval_pairs, "beta": train.get("beta") or 0.1,
               "max_length": train.get("max_length", 1024), "max_prompt_length": train.get("max_prompt_length"),
               "batch_size": train.get("batch_size", 8), "seed": cfg.seed,
               "mixed_precision": train.get("mixed_precision", "auto"),
               "base_cache": str(Path(cfg.output_dir) / "round-0" / "base_cache.json")}
    result = evaluate_model(EvalConfig.from_options(options, "preftune iterate --eval-pairs"))
    return {"preference": result["preference"], "nll": result["nll"]}


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def round_rows(base: dict, rounds: list[dict], held_out: bool) -> list[tuple[str, ...]]:
    """The report table's rows: the starting model, then one per round (``held_out``: with the held-out pairs'
    accuracy and NLL regression columns)."""
    rows = [("0 (start)", _number(base.get("judge_score")), "", "", "", "", "") + (("", "") if held_out else ())]
    for r in rounds:
        pairs, seconds = r.get("pairs", {}), r.get("stage_seconds", {})
        kl = r["kl"]
        row = (str(r["round"]), _number(r.get("judge_score")), rate_text(r["win_vs_base"]),
               rate_text(r["win_vs_previous"]), f"{_number(kl['mean'])} ± {_number(kl['stderr'])}",
               f"{pairs.get('pairs', '?')} / {pairs.get('skipped_ties', '?')}",
               " / ".join(_number(seconds.get(s), 1) for s in STAGE_COLUMNS))
        if held_out:
            pair_numbers = r.get("held_out_pairs") or {"preference": {}, "nll": {}}
            row = row[:5] + (_number(pair_numbers["preference"].get("accuracy")),
                             _number(pair_numbers["nll"].get("difference"), 4)) + row[5:]
        rows.append(row)
    return rows


def report_text(metrics: dict) -> str:
    """``report.md``: the settings, one row per round, what stopped the loop."""
    s, rounds = metrics["settings"], metrics["rounds"]
    train = {k.removeprefix("train."): v for k, v in s.items() if k.startswith("train.")}
    held_out = bool(s.get("eval_pairs"))
    header = ("round", "judge score", "win rate vs start [95% CI] (n)", "win rate vs previous round",
              "KL to start (nats) ± se", *(("held-out pair accuracy", "held-out NLL - start's (nats/token)")
                                           if held_out else ()),
              "pairs kept / prompts tied", "seconds: sample / judge / pairs / train / measure")
    lines = [
        "# preftune iterate", "",
        f"Start `{s['model']}`, judge `{s['judge']}`; {len(rounds)} round(s) of {s['samples']} samples on each of "
        f"{s['prompts_per_round']} {'reused' if s['reuse_prompts'] else 'fresh'} prompts, reference "
        f"{s['reference']}, train options {json.dumps(train) if train else '(defaults: dpo)'}; measured on the "
        f"held-out prompts of `{s['eval_prompts']}` (one sample each, the same seed every round).", "",
        *markdown_table(header, round_rows(metrics["base"], rounds, held_out)), "",
        f"Total {metrics['seconds']:.1f} s. ![judge score and win rates per round](iterate.svg)", ""]
    if metrics["stopped"]:
        last = rounds[-1]["win_vs_previous"]
        lines += [f"Stopped after round {len(rounds)} (--stop-when-no-gain): its win rate over the round before, "
                  f"{rate_text(last)}, has a 95% interval that includes 0.5.", ""]
    return "\n".join(lines)


def plot_svg(base: dict, rounds: list[dict], width: int = 640, height: int = 260) -> str:
    """Two panels: the held-out judge score per round (round 0: the start), and the win rates over the start
    and over the previous round with their 95% intervals (a dashed line at 0.5)."""
    xs = list(range(len(rounds) + 1))
    scores = [base.get("judge_score")] + [r.get("judge_score") for r in rounds]
    panel_w, top, bottom = width / 2 - 50, 30, height - 40

    def x_at(i: int, left: float) -> float:
        return left + (i / max(1, len(xs) - 1)) * panel_w

    def y_at(v: float, low: float, high: float) -> float:
        return bottom - (v - low) / ((high - low) or 1) * (bottom - top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    known = [v for v in scores if v is not None]
    if known:
        low, high = min(known), max(known)
        low, high = low - 0.1 * ((high - low) or 1), high + 0.1 * ((high - low) or 1)
        points = " ".join(f"{x_at(i, 40):.1f},{y_at(v, low, high):.1f}" for i, v in zip(xs, scores) if v is not None)
        parts += [f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>',
                  *(f'<text x="{x_at(i, 40):.1f}" y="{y_at(v, low, high) - 6:.1f}" text-anchor="middle">{v:.3f}</text>'
                    for i, v in zip(xs, scores) if v is not None)]
    parts.append('<text x="40" y="16">held-out judge score per round</text>')
    left = width / 2 + 30
    parts.append(f'<text x="{left}" y="16">win rate vs start (blue), vs previous (orange)</text>')
    half = y_at(0.5, 0, 1)
    parts += [f'<line x1="{left}" x2="{left + panel_w}" y1="{half:.1f}" y2="{half:.1f}" stroke="#999" '
              'stroke-dasharray="4 3"/>', f'<text x="{left - 4}" y="{half + 4:.1f}" text-anchor="end">0.5</text>']
    for key, colour, shift in (("win_vs_base", "#1f77b4", -4), ("win_vs_previous", "#ff7f0e", 4)):
        for i, r in enumerate(rounds, start=1):
            w, x = r[key], x_at(i, left) + shift
            parts += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_at(w["low"], 0, 1):.1f}" '
                      f'y2="{y_at(w["high"], 0, 1):.1f}" stroke="{colour}"/>',
                      f'<circle cx="{x:.1f}" cy="{y_at(w["rate"], 0, 1):.1f}" r="3" fill="{colour}"/>']
    for i in xs:
        parts += [f'<text x="{x_at(i, 40):.1f}" y="{height - 20}" text-anchor="middle">{i}</text>',
                  f'<text x="{x_at(i, left):.1f}" y="{height - 20}" text-anchor="middle">{i}</text>']
    parts += [f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">round</text>', "</svg>"]
    return "\n".join(parts) + "\n"
