"""The real recipe's iterative stage: Task A's on-policy rounds (:func:`preftune.recipes.iterate.run_iterate`)
on the same budget of judged samples and training steps as the offline best-vs-worst DPO run, then the last
round against that offline model on the held-out films (:func:`task_a_iterative`).

Offline (stages 2-3): the base writes ``a_samples_per_prompt`` reviews of each of ``a_train_films`` films,
DPO trains once on their best-vs-worst pairs. Iterative: ``a_iter_rounds`` rounds, each sampling the same
number of reviews of a fresh ``a_train_films / a_iter_rounds`` slice of those films from the current policy
(round 1: the base), judged by the same lexicon judge, best vs worst, DPO from the current policy with the
offline run's settings — so both have judged the same number of samples and trained the same number of
steps (one epoch over their pairs, batch ``batch_size``).
"""

from __future__ import annotations

from pathlib import Path

from preftune.recipes.real_config import JUDGE_A, RealRecipeConfig
from preftune.recipes.real_training import evaluate

ITERATE_DIR = "a_iterate"  # the iterate run's folder (its own report.md, metrics.json, round-N/)


def iterate_settings(cfg: RealRecipeConfig, out: Path, base: Path):
    """The :class:`~preftune.recipes.iterate_config.IterateConfig` of the stage: prompt files written into
    ``out/data`` (training films in the offline run's order; every held-out film ``a_eval_pairs_per_film``
    times, as the offline evaluation samples them)."""
    from preftune.data.convert import write_rows
    from preftune.recipes.iterate_config import IterateConfig
    from preftune.recipes.real_task_a import film_prompt, task_a_films

    if cfg.a_iter_rounds < 1 or cfg.a_train_films < cfg.a_iter_rounds:
        raise ValueError(f"a_iter_rounds must be between 1 and a_train_films ({cfg.a_train_films}), "
                         f"got {cfg.a_iter_rounds}")
    train_films, held_out_films = task_a_films(cfg)
    data = out / "data"
    write_rows(data / "a_iter_prompts.jsonl", [{"prompt": film_prompt(t)} for t in train_films])
    write_rows(data / "a_iter_eval_prompts.jsonl", [{"prompt": film_prompt(t)} for t in held_out_films
                                                    for _ in range(cfg.a_eval_pairs_per_film)])
    train = {"loss": "dpo", "beta": cfg.a_beta, "learning_rate": cfg.a_learning_rate, "epochs": cfg.a_epochs,
             "batch_size": cfg.batch_size, "max_length": cfg.max_length,
             "max_prompt_length": cfg.max_prompt_length, "warmup_ratio": cfg.warmup_ratio,
             "lr_scheduler": "cosine", "logging_steps": 5, "mixed_precision": cfg.mixed_precision,
             "gradient_checkpointing": cfg.gradient_checkpointing}
    return IterateConfig(model=str(base), prompts=str(data / "a_iter_prompts.jsonl"),
                         eval_prompts=str(data / "a_iter_eval_prompts.jsonl"), judge=JUDGE_A,
                         output_dir=str(out / ITERATE_DIR), rounds=cfg.a_iter_rounds,
                         samples=cfg.a_samples_per_prompt, prompts_per_round=cfg.a_train_films // cfg.a_iter_rounds,
                         reference=cfg.a_iter_reference, max_new_tokens=cfg.a_max_new_tokens,
                         sample_batch_size=cfg.generation_batch_size, kl_samples=1,
                         eval_pairs=str(data / "a_eval_pairs.jsonl"), seed=cfg.seed, progress=cfg.progress,
                         train=train)


def task_a_iterative(cfg: RealRecipeConfig, out: Path, base: Path, offline_steps: int | None, echo=print) -> dict:
    """Run the rounds into ``out/a_iterate`` and compare the last round with the offline DPO model
    (``out/a_dpo``) on Task A's held-out prompts -> the stage's metrics: per round judge score, win rates over
    the base and the previous round, KL to the base, pairs and steps; the budget of both runs; the last
    round's win rate over the offline model (the same judge, one sample each, Wilson interval)."""
    from preftune.recipes.iterate import run_iterate

    settings = iterate_settings(cfg, out, base)
    result = run_iterate(settings, echo=echo)
    rounds = [{"round": r["round"], "judge_score": r.get("judge_score"), "positive": r.get("positive"),
               "win_vs_base": r.get("win_vs_base"), "win_vs_previous": r.get("win_vs_previous"),
               "kl": (r.get("kl") or {}).get("mean"), "kl_stderr": (r.get("kl") or {}).get("stderr"),
               "pairs": (r.get("pairs") or {}).get("pairs"), "steps": (r.get("train") or {}).get("steps"),
               "preference_accuracy": ((r.get("held_out_pairs") or {}).get("preference") or {}).get("accuracy"),
               "nll_difference": ((r.get("held_out_pairs") or {}).get("nll") or {}).get("difference"),
               "seconds": sum((r.get("stage_seconds") or {}).values())}
              for r in result.metrics["rounds"]]
    last = out / ITERATE_DIR / f"round-{result.rounds}" / "model"
    data = out / "data" / "a_eval_pairs.jsonl"
    n_prompts = sum(1 for _ in open(data))
    versus = evaluate(cfg, last, data, ref_model=out / "a_dpo", generate=n_prompts, judge=JUDGE_A,
                      max_new_tokens=cfg.a_max_new_tokens)["generation"]
    base_row = result.metrics["base"]
    per_round = cfg.a_train_films // cfg.a_iter_rounds
    return {"rounds": rounds, "rounds_asked": cfg.a_iter_rounds, "reference": cfg.a_iter_reference,
            "prompts_per_round": per_round,
            "base_judge_score": base_row.get("judge_score"), "eval_prompts": base_row.get("prompts"),
            "judged_samples": per_round * cfg.a_iter_rounds * cfg.a_samples_per_prompt,
            "offline_judged_samples": cfg.a_train_films * cfg.a_samples_per_prompt,
            "steps": sum(r["steps"] or 0 for r in rounds), "offline_steps": offline_steps,
            "win_vs_offline": versus["win_rate"], "score_last": versus.get("score_model"),
            "score_offline": versus.get("score_base"), "versus_prompts": n_prompts,
            "report": f"{ITERATE_DIR}/report.md"}


def iterative_summary(it: dict) -> str:
    """One line per round and the comparison with the offline model, for the stage's output and the report."""
    from preftune.recipes.stages import rate_text

    lines = [f"  round {r['round']}: judge score {r['judge_score']:+.3f}, win vs base {rate_text(r['win_vs_base'])}, "
             f"vs previous {rate_text(r['win_vs_previous'])}, KL {r['kl']:.2f}" for r in it["rounds"]]
    lines.append(f"  last round vs offline DPO ({it['judged_samples']} vs {it['offline_judged_samples']} judged "
                 f"samples, {it['steps']} vs {it['offline_steps']} steps): win rate {rate_text(it['win_vs_offline'])}")
    return "\n".join(lines)

