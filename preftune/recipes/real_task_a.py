"""The real recipe's Task A, controlled sentiment (Rafailov et al. 2023, section 6.1): pairs and response
groups from the base's own samples scored by the lexicon judge (:func:`task_a_pairs`), and each DPO model
against the base on held-out films (:func:`task_a_evaluation` for the best-vs-worst run,
:func:`task_a_group_evaluation` for the run on whole groups). The DPO runs between them are
:func:`preftune.recipes.real_training.train_stage`."""

from __future__ import annotations

from pathlib import Path

from preftune.recipes.real_config import A_PROMPT, JUDGE_A, RealRecipeConfig
from preftune.recipes.real_training import evaluate
from preftune.recipes.stages import example_samples


def film_prompt(title: str) -> list[dict]:
    """Task A's prompt for the film ``title``, as one user chat message."""
    return [{"role": "user", "content": A_PROMPT.format(title=title)}]


def task_a_films(cfg: RealRecipeConfig) -> tuple[list[str], list[str]]:
    """Task A's film titles: ``a_train_films`` training films (the generated titles repeated when there are
    fewer) and ``a_held_out_films`` held-out ones, disjoint; the same for every Task A stage of a seed."""
    from preftune.recipes.quickstart_world import film_titles

    train_films, held_out_films = film_titles(cfg.a_held_out_films, seed=cfg.seed)
    return [train_films[i % len(train_films)] for i in range(cfg.a_train_films)], held_out_films


def task_a_pairs(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """Training pairs (best vs worst of each film's samples), training groups (all of each film's samples
    with their judge scores, :func:`score_groups`) and held-out pairs, from the base's samples."""
    from preftune.data.convert import write_rows
    from preftune.evaluation.judges.registry import make_judge
    from preftune.evaluation.pairs import best_vs_worst_pairs, scores_per_prompt
    from preftune.model.loading import load_model, load_tokenizer

    if cfg.a_samples_per_prompt < 2:
        raise ValueError(f"a_samples_per_prompt must be >= 2 (a best and a worst), got {cfg.a_samples_per_prompt}")
    train_films, held_out_films = task_a_films(cfg)
    judge = make_judge(JUDGE_A)
    tokenizer, model = load_tokenizer(str(base)), load_model(str(base)).eval()
    prompts = [film_prompt(t) for t in train_films]
    samples = sample_in_chunks(cfg, model, tokenizer, prompts, cfg.a_samples_per_prompt, cfg.seed + 1,
                               "sampling the base (train films)")
    pairs, ties = best_vs_worst_pairs(prompts, samples, judge)
    pairs = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    groups = score_groups(prompts, samples, scores_per_prompt(judge, prompts, samples))
    held_prompts = [film_prompt(t) for t in held_out_films]
    held_samples = sample_in_chunks(cfg, model, tokenizer, held_prompts, 2 * cfg.a_eval_pairs_per_film,
                                    cfg.seed + 2, "sampling the base (held-out films)")
    eval_pairs = spread_pairs(held_prompts, held_samples, judge, cfg.a_eval_pairs_per_film)
    if len(pairs) < 2 or len(groups) < 2 or not eval_pairs:
        raise ValueError(f"task A: {len(pairs)} training and {len(eval_pairs)} held-out pairs: the judge tied on "
                         "almost every film's samples (more samples per film or more new tokens would help)")
    write_rows(out / "data" / "a_train_pairs.jsonl", pairs)
    write_rows(out / "data" / "a_train_groups.jsonl", groups)
    write_rows(out / "data" / "a_eval_pairs.jsonl", eval_pairs)
    return {"judge": JUDGE_A, "train_films": len(set(train_films)), "held_out_films": len(held_out_films),
            "train_pairs": len(pairs), "skipped_ties": ties, "eval_pairs": len(eval_pairs),
            "train_groups": len(groups), "group_responses": sum(len(g["responses"]) for g in groups),
            "group_ordered_pairs": sum(ordered_pairs(g["scores"]) for g in groups),
            "films_disjoint": not set(train_films) & set(held_out_films)}


def score_groups(prompts: list, samples: list[list[str]], scores: list[list[float]]) -> list[dict]:
    """One response group ``{"prompt", "responses", "scores"}`` per prompt: all its samples with their judge
    scores, empty samples left out; a prompt left with fewer than two responses, or whose responses all
    score the same (no ordered pair to learn from), makes no group."""
    groups = []
    for prompt, row, values in zip(prompts, samples, scores):
        kept = [(text, float(score)) for text, score in zip(row, values) if text.strip()]
        if len(kept) >= 2 and len({score for _, score in kept}) > 1:
            groups.append({"prompt": prompt, "responses": [t for t, _ in kept], "scores": [x for _, x in kept]})
    return groups


def ordered_pairs(scores: list[float]) -> int:
    """How many of a group's response pairs have different scores (the pairs ``--group-pairs all`` trains on)."""
    return sum(a != b for i, a in enumerate(scores) for b in scores[i + 1:])


def spread_pairs(prompts: list, samples: list[list[str]], judge, per_prompt: int) -> list[dict]:
    """``per_prompt`` pairs from each prompt's ``2 * per_prompt`` samples ranked by ``judge``: (best, worst),
    (second best, second worst), ...; a pair of equal scores (or an empty side) is skipped."""
    flat = judge.score([p for p, row in zip(prompts, samples) for _ in row], [s for row in samples for s in row])
    pairs, offset = [], 0
    for prompt, row in zip(prompts, samples):
        ranked = sorted(zip(flat[offset:offset + len(row)], row), key=lambda item: -item[0])
        offset += len(row)
        for i in range(per_prompt):
            (high, chosen), (low, rejected) = ranked[i], ranked[-1 - i]
            if high > low and chosen.strip() and rejected.strip():
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def sample_in_chunks(cfg: RealRecipeConfig, model, tokenizer, prompts: list, n: int, seed: int,
                     desc: str) -> list[list[str]]:
    """:func:`preftune.evaluation.sampling.sample` (temperature 1) in chunks under a progress bar: ``texts[i][j]``."""
    from tqdm.auto import tqdm

    from preftune.evaluation.sampling import sample
    from preftune.model.precision import resolve_compute_dtype

    compute = resolve_compute_dtype(cfg.mixed_precision, next(model.parameters()).device)
    per_chunk = max(1, cfg.generation_batch_size // n)
    texts: list[list[str]] = []
    with tqdm(total=len(prompts), desc=f"  {desc}", unit="prompt", disable=not cfg.progress) as bar:
        for chunk_index, start in enumerate(range(0, len(prompts), per_chunk)):
            chunk = prompts[start:start + per_chunk]
            texts += sample(model, tokenizer, chunk, n=n, max_new_tokens=cfg.a_max_new_tokens, temperature=1.0,
                            seed=seed * 1000 + chunk_index, batch_size=cfg.generation_batch_size,
                            compute_dtype=compute)
            bar.update(len(chunk))
    return texts


BASE_CACHE_A = "a_base_cache.json"  # the base's share of Task A's evaluations, shared by both DPO runs


def task_a_evaluation(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """The best-vs-worst DPO model (``a_dpo``) against the base on the held-out pairs' prompts (one sample
    each, judged); the base's share is kept in :data:`BASE_CACHE_A` for :func:`task_a_group_evaluation`."""
    return evaluate_against_base(cfg, out, base, out / "a_dpo", out / "a_samples.jsonl")


def task_a_group_evaluation(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """The DPO model trained on whole groups (``a_group_dpo``) against the base, as
    :func:`task_a_evaluation` does it (the same held-out prompts and base samples, read from
    :data:`BASE_CACHE_A`); samples in ``a_group_samples.jsonl``."""
    return evaluate_against_base(cfg, out, base, out / "a_group_dpo", out / "a_group_samples.jsonl")


def evaluate_against_base(cfg: RealRecipeConfig, out: Path, base: Path, model: Path, samples_file: Path) -> dict:
    """``model`` against the base on the held-out pairs' prompts: judge scores of both sides, win rate, KL,
    preference accuracy, NLL difference and three example samples; every sample written to ``samples_file``."""
    from preftune.data.convert import write_rows
    from preftune.recipes.sentiment import review_sentiment

    data = out / "data" / "a_eval_pairs.jsonl"
    n_prompts = sum(1 for _ in open(data))
    result = evaluate(cfg, model, data, ref_model=base, generate=n_prompts, judge=JUDGE_A,
                      max_new_tokens=cfg.a_max_new_tokens, base_cache=out / BASE_CACHE_A)
    generation = result["generation"]
    samples = [{"prompt": s["prompt"].removeprefix("user: "), "base": s["base"].strip(), "dpo": s["model"].strip(),
                "base_score": review_sentiment("", s["base"]), "dpo_score": review_sentiment("", s["model"])}
               for s in generation["samples"]]
    write_rows(samples_file, samples)

    def describe(side: str) -> dict:
        scores, texts = [s[f"{side}_score"] for s in samples], [s[side] for s in samples]
        return {"mean_score": sum(scores) / len(scores), "positive": sum(x > 0 for x in scores) / len(scores),
                "negative": sum(x < 0 for x in scores) / len(scores), "zero": sum(x == 0 for x in scores) / len(scores),
                "mean_words": sum(len(t.split()) for t in texts) / len(texts)}

    return {"eval_prompts": n_prompts, "base": describe("base"), "dpo": describe("dpo"),
            "win_rate": generation["win_rate"], "kl": {"mean": generation["kl"], "stderr": generation["kl_stderr"],
                                                       "samples": generation["kl_samples"]},
            "preference_accuracy": result["preference"]["accuracy"], "nll_difference": result["nll"]["difference"],
            "examples": example_samples(samples, 3)}
