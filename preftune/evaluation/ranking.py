"""Held-out preferences as rankings: response groups scored through the training data path, and the
metrics every held-out preference file gets, pairs and groups alike.

A pair is a group of two responses scored 1 (chosen) and 0 (rejected), so one set of metrics covers
both: :func:`preference_summary` (accuracy, rewards, DPO loss, log-probs, ranking accuracy, Kendall's
tau-b, the chosen response's log-prob change vs the base) and, for a reward model,
:func:`reward_model_preference`. A file holding response groups is scored by :func:`group_table`:
the training loop's collate and :func:`preftune.model.logprobs.batch_logps` (one forward per group,
the prompt computed once), each response's value read as (G, K) by
:func:`preftune.model.logprobs.group_logps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.config.eval_config import EvalConfig
from preftune.data.records import TokenizedExample
from preftune.evaluation.base_cache import BaseCache
from preftune.evaluation.metrics import best_response_mean, ranking_metrics, wilson_interval
from preftune.methods.losses.groups import ordered_pairs
from preftune.methods.objective import compute_objective
from preftune.model.logprobs import LogpOutput, batch_logps, group_logps
from preftune.training.reference import examples_fingerprint


def label_scores(examples: list[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, K) float32 scores (higher = better; a pair's chosen 1, rejected 0; 0 beyond a group's own
    responses) and the (G, K) bool mask of which responses exist, K the most responses of an example."""
    k_max = max(len(ex.completions) for ex in examples)
    scores = torch.zeros((len(examples), k_max), dtype=torch.float32)
    mask = torch.zeros((len(examples), k_max), dtype=torch.bool)
    for g, ex in enumerate(examples):
        values = ex.scores if ex.scores is not None else [1.0, 0.0]
        scores[g, :len(values)] = torch.tensor(values, dtype=torch.float32)
        mask[g, :len(values)] = True
    return scores, mask


@torch.no_grad()
def group_table(model, examples: list[TokenizedExample], collate, cfg: EvalConfig, device, compute=None,
                rewards: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out examples (pairs or groups) through the training loop's batches and ``batch_logps``:
    (G, K) float32 summed log-probs of each response (a reward model's rewards with ``rewards``), row g
    of ``examples[g]``, K the most responses of an example, 0 beyond an example's own; and their (G, K)
    long completion-token counts."""
    k_max = max(len(ex.completions) for ex in examples)
    values = torch.zeros((len(examples), k_max), dtype=torch.float32)
    counts = torch.zeros((len(examples), k_max), dtype=torch.long)
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start:start + cfg.batch_size]).to(device)
        out = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size, compute_dtype=compute)
        table = group_logps(out.rewards if rewards else out.logps, batch)  # (G_b, K_b), 0 where absent
        rows, k = slice(start, start + batch.num_groups), table.logps.shape[1]
        values[rows, :k], counts[rows, :k] = table.logps.cpu(), table.counts.cpu()
    return values, counts


@torch.no_grad()
def group_preference_metrics(model, base, examples, collate, cfg: EvalConfig, device, compute=None,
                             cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """Held-out response groups: the DPO metrics over their ordered pairs (two responses of a group whose
    scores differ, the better one as chosen: what ``--loss dpo`` trains on for a group), exact means
    over the whole file, with :func:`preference_summary`'s ranking metrics. Without a base the
    reference log-probs are 0 (the raw log-prob preference). The base's (G, K) log-probs are kept in
    ``cache`` as "held-out group log-probs". ``pairs`` counts the ordered pairs, ``groups`` the groups.
    -> ``(metrics, (the best responses' log-probs (G,), the base's (G,) or None, their token counts (G,)))``,
    the best response being the first of those holding the top score (the NLL's responses)."""
    logps, counts = group_table(model, examples, collate, cfg, device, compute)
    if base is None:
        ref_logps = torch.zeros_like(logps)
    elif cache is None:
        ref_logps = group_table(base, examples, collate, cfg, device, compute)[0]
    else:
        ref_logps = torch.tensor(cache.get_or_compute(
            "held-out group log-probs", {"examples": examples_fingerprint(examples), **(layout or {})},
            lambda: group_table(base, examples, collate, cfg, device, compute)[0].tolist()), dtype=torch.float32)
    scores, mask = label_scores(examples)
    if not len(ordered_pairs(scores, mask)):
        raise ValueError(f"{cfg.data}: every held-out group has all its responses tied: no ordered pair to evaluate")
    flat = LogpOutput(logps.t().reshape(-1), counts.t().reshape(-1), logps.new_zeros(0))  # (S,), s = k * G + g
    _, metrics = compute_objective("dpo", flat, len(examples), ref_logps=ref_logps.t().reshape(-1), beta=cfg.beta,
                                   scores=scores, completion_mask=mask)
    summary = preference_summary(metrics, logps, ref_logps, scores, mask, cfg, base is not None)
    definition = ("beta * (logp_model - logp_ref): better > worse response of each ordered pair" if base is not None
                  else "raw log-prob preference: logp(better) > logp(worse) response of each ordered pair "
                       "(no reference model given)")
    best = best_index(examples)

    def at_best(table: torch.Tensor) -> torch.Tensor:  # (G, K) -> (G,)
        return table.gather(1, best.unsqueeze(1)).squeeze(1)

    return ({"pairs": summary["ordered_pairs"], "groups": len(examples), **summary, "accuracy_definition": definition},
            (at_best(logps), at_best(ref_logps) if base is not None else None, at_best(counts)))


def preference_summary(metrics: dict, logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor | None, cfg: EvalConfig, has_base: bool) -> dict:
    """The preference part of an evaluation from ``compute_objective``'s DPO ``metrics`` and the (G, K)
    log-probs of model and base (zeros without a base), scores and mask: accuracy, log-probs, rewards
    and DPO loss (None without a base); ``ranking_accuracy`` / ``ordered_pairs`` / ``kendall_tau`` /
    ``tau_groups`` of the implicit rewards ``beta * (logp - logp_ref)`` against the scores
    (:func:`preftune.evaluation.metrics.ranking_metrics`); ``chosen_logp_change``: the mean
    ``logp_model - logp_base`` of the chosen response (a group's best), negative when the model lowered
    it (None without a base)."""
    m = {k: float(v) for k, v in metrics.items()}
    out = {"accuracy": m["rewards/accuracies"], "logps_chosen": m["logps/chosen"],
           "logps_rejected": m["logps/rejected"], "logp_margin": m["logps/chosen"] - m["logps/rejected"],
           **ranking_metrics(cfg.beta * (logps - ref_logps), scores, mask),
           "chosen_logp_change": best_response_mean(logps - ref_logps, scores, mask) if has_base else None}
    if has_base:
        out.update(reward_chosen=m["rewards/chosen"], reward_rejected=m["rewards/rejected"],
                   reward_margin=m["rewards/margins"], dpo_loss=m["loss"], beta=cfg.beta)
    else:
        out.update(reward_chosen=None, reward_rejected=None, reward_margin=None, dpo_loss=None, beta=None)
    return out


def reward_model_preference(rewards: torch.Tensor, examples: list[TokenizedExample]) -> dict:
    """A reward model's held-out metrics from its (G, K) rewards of ``examples`` (pairs or groups): over
    the ordered pairs (a pair's chosen and rejected; a group's better and worse responses, ties skipped)
    the accuracy reward(better) > reward(worse) with its 95 % Wilson interval, the mean rewards, margin and
    Bradley-Terry loss; the ranking accuracy and Kendall's tau-b of the rewards against the labels."""
    scores, mask = label_scores(examples)
    pairs = ordered_pairs(scores, mask)
    if not len(pairs):
        raise ValueError("every held-out group has all its responses tied: no ordered pair to evaluate")
    better, worse = pairs.better_of(rewards), pairs.worse_of(rewards)  # (P,) each
    accuracy = float((better > worse).float().mean())
    low, high = wilson_interval(accuracy, len(pairs))
    groups = any(ex.scores is not None for ex in examples)
    return {"pairs": len(pairs), "groups": len(examples) if groups else None, "accuracy": accuracy,
            "accuracy_low": low, "accuracy_high": high,
            "accuracy_definition": ("reward(better) > reward(worse) response of each ordered pair" if groups else
                                    "reward(chosen) > reward(rejected)") + " (reward model)",
            "reward_chosen": float(better.mean()), "reward_rejected": float(worse.mean()),
            "reward_margin": float((better - worse).mean()), "logps_chosen": None, "logps_rejected": None,
            "logp_margin": None, "dpo_loss": None, "beta": None, "bt_loss": float(F.softplus(worse - better).mean()),
            **ranking_metrics(rewards, scores, mask), "chosen_logp_change": None}


def best_index(groups: list[TokenizedExample]) -> torch.Tensor:
    """(G,) long: each group's best response, the first of those holding the top score (the response the
    NLL is measured on)."""
    return torch.tensor([max(range(len(ex.scores)), key=lambda k: (ex.scores[k], -k)) for ex in groups],
                        dtype=torch.long)
