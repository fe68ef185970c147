"""Pairs and candidates from a model's own samples.

* :func:`best_vs_worst_pairs` — best and worst of n samples per prompt, by a judge: preference
  pairs ``preftune train`` reads; :func:`onpolicy_pairs` samples them from a model folder first
  (``preftune generate --n N``).
* :func:`candidate_records` / :func:`onpolicy_candidates` — every sample per prompt kept, as a
  candidates file for people to label (``preftune generate --keep-all``, ``preftune label serve``);
  with a judge each record also holds the judge's ``scores``: a response group ``preftune train``
  reads (kind "group").
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from preftune.evaluation.judges.base import Judge, Prompt, ScoringJudge, check_lengths
from preftune.evaluation.judges.registry import make_judge
from preftune.evaluation.sampling import sample_from_path


def scores_per_prompt(judge: ScoringJudge, prompts: Sequence[Prompt],
                      samples_per_prompt: Sequence[Sequence[str]]) -> list[list[float]]:
    """``scores[i][j]``: the judge's score of prompt i's j-th sample, all samples scored in one call."""
    flat_scores = judge.score([p for p, samples in zip(prompts, samples_per_prompt) for _ in samples],
                              [s for samples in samples_per_prompt for s in samples])
    scores, offset = [], 0
    for samples in samples_per_prompt:
        scores.append(flat_scores[offset:offset + len(samples)])
        offset += len(samples)
    return scores


def round_robin_points(prompts: Sequence[Prompt], samples_per_prompt: Sequence[Sequence[str]],
                       judge: Judge) -> list[list[float]]:
    """``points[i][j]``: prompt i's j-th sample's points when every pair of the prompt's samples is
    compared once (its outcome per game: 1, 0.5 or 0), all games in one ``compare`` call."""
    games = [(p_index, i, j) for p_index, samples in enumerate(samples_per_prompt)
             for i in range(len(samples)) for j in range(i + 1, len(samples))]
    result = judge.compare([prompts[p] for p, _, _ in games],
                           [samples_per_prompt[p][i] for p, i, _ in games],
                           [samples_per_prompt[p][j] for p, _, j in games])
    points = [[0.0] * len(samples) for samples in samples_per_prompt]
    for (p, i, j), outcome in zip(games, result.outcomes):
        points[p][i] += outcome
        points[p][j] += 1.0 - outcome
    return points


def best_vs_worst_pairs(prompts: Sequence[Prompt], samples_per_prompt: Sequence[Sequence[str]],
                        judge: Judge) -> tuple[list[dict], int]:
    """One preference pair per prompt: its best sample as chosen, its worst as rejected.

    A scoring judge scores every sample (first of equal scores wins). A pairwise judge
    plays a round robin: every pair of a prompt's k samples is compared once (k(k-1)/2
    comparisons, each asked in both orders by the openai judge), a sample earns its
    outcome (1, 0.5 or 0) per game, and the most / fewest points pick best / worst.
    Prompts whose samples all tie (or whose best and worst texts are identical) are skipped.

    Returns ``(pairs, skipped_ties)`` with pairs ``{"prompt", "chosen", "rejected"}``.
    """
    check_lengths(prompts=prompts, samples_per_prompt=samples_per_prompt)
    for samples in samples_per_prompt:
        if len(samples) < 2:
            raise ValueError(f"best_vs_worst_pairs needs >= 2 samples per prompt, got {len(samples)}")
    if isinstance(judge, ScoringJudge):
        points = scores_per_prompt(judge, prompts, samples_per_prompt)
    else:
        points = round_robin_points(prompts, samples_per_prompt, judge)
    pairs, skipped_ties = [], 0
    for prompt, samples, values in zip(prompts, samples_per_prompt, points):
        best = max(range(len(values)), key=values.__getitem__)
        worst = min(range(len(values)), key=values.__getitem__)
        if values[best] == values[worst] or samples[best] == samples[worst]:
            skipped_ties += 1
            continue
        pairs.append({"prompt": prompt, "chosen": samples[best], "rejected": samples[worst]})
    return pairs, skipped_ties


def candidate_records(prompts: Sequence[Prompt], samples_per_prompt: Sequence[Sequence[str]],
                      judge: Judge | None = None, meta: dict | None = None) -> list[dict]:
    """Every sample of every prompt: ``{"prompt", "responses": [...], "meta": {...}}`` per prompt.

    ``meta`` (e.g. the model and sampling settings) is copied into each record, with ``n`` the number
    of responses unless ``meta`` gives it. With a judge each record is also a response group
    (``preftune train`` reads it as kind "group"): ``"scores"``, one per response in order — a scoring
    judge's scores (also in ``meta["scores"]``), or a pairwise judge's round-robin points
    (:func:`round_robin_points`: every pair of the prompt's responses compared once). Empty samples
    are kept: the labelling app lets people mark both responses bad (training refuses them:
    :func:`onpolicy_candidates` leaves them out before judging).
    """
    check_lengths(prompts=prompts, samples_per_prompt=samples_per_prompt)
    scores: list[list[float]] | None = None
    if isinstance(judge, ScoringJudge):
        scores = [[float(x) for x in values] for values in scores_per_prompt(judge, prompts, samples_per_prompt)]
    elif judge is not None:
        scores = round_robin_points(prompts, samples_per_prompt, judge)
    records = []
    for i, (prompt, samples) in enumerate(zip(prompts, samples_per_prompt)):
        record_meta = {"n": len(samples), **(meta or {})}
        record = {"prompt": prompt, "responses": list(samples)}
        if scores is not None:
            record["scores"] = scores[i]
            if isinstance(judge, ScoringJudge):
                record_meta["scores"] = scores[i]
        records.append({**record, "meta": record_meta})
    return records


def onpolicy_candidates(model_path, prompts: Sequence[Prompt], n: int = 4, judge: str | Judge | None = None,
                        max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                        batch_size: int = 8, dtype: str = "float32", trust_remote_code: bool = False,
                        device: str | None = None, mixed_precision: str = "no") -> list[dict]:
    """Load ``model_path``, sample ``n`` responses per prompt, and return :func:`candidate_records`
    (the meta records the model, the sampling settings and ``n``).

    With ``judge`` the records are response groups for training: empty samples (which training
    refuses) are left out before judging, and a prompt left with fewer than 2 samples is left out
    (``meta["n"]`` minus the number of responses is how many were empty)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if judge is not None and n < 2:
        raise ValueError(f"--n must be >= 2 for judged response groups (got {n})")
    judge = make_judge(judge) if isinstance(judge, str) else judge
    samples = sample_from_path(model_path, prompts, n, max_new_tokens, temperature, top_p, seed, batch_size, dtype,
                               trust_remote_code, device, mixed_precision)
    meta = {"model": str(model_path), "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
            "seed": seed, "n": n}
    if judge is not None:
        kept = [(prompt, [s for s in drawn if s.strip()]) for prompt, drawn in zip(prompts, samples)]
        kept = [(prompt, drawn) for prompt, drawn in kept if len(drawn) >= 2]
        prompts, samples = [p for p, _ in kept], [s for _, s in kept]
    return candidate_records(prompts, samples, judge, meta)


def onpolicy_pairs(model_path: str | os.PathLike, prompts: Sequence[Prompt], judge: str | Judge, n: int = 4,
                   max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 8, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | None = None, mixed_precision: str = "no") -> tuple[list[dict], dict[str, int]]:
    """On-policy preference pairs: ``n`` samples per prompt, best vs worst by ``judge``.

    Returns ``(pairs, counts)``: pairs are ``{"prompt", "chosen", "rejected"}`` records that
    ``preftune train`` reads (:func:`preftune.evaluation.pairs.best_vs_worst_pairs`); ``counts`` has
    ``prompts``, ``pairs``, ``skipped_ties`` (every sample of the prompt tied) and
    ``skipped_empty`` (the best or worst sample was empty text, which training refuses).
    """
    if n < 2:
        raise ValueError(f"--n must be >= 2 to have a best and a worst sample (got {n})")
    judge = make_judge(judge) if isinstance(judge, str) else judge
    samples = sample_from_path(model_path, prompts, n, max_new_tokens, temperature, top_p, seed, batch_size, dtype,
                               trust_remote_code, device, mixed_precision)
    pairs, skipped_ties = best_vs_worst_pairs(prompts, samples, judge)
    kept = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    return kept, {"prompts": len(prompts), "pairs": len(kept), "skipped_ties": skipped_ties,
                  "skipped_empty": len(pairs) - len(kept)}
