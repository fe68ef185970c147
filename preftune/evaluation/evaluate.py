"""Evaluate a model against its base: held-out preferences, NLL regression, KL and win rate.

:func:`evaluate_model` answers four questions about ``cfg.model`` (usually a trained run folder)
and ``cfg.ref_model`` (the base it started from), with the options of an
:class:`~preftune.config.eval_config.EvalConfig`:

1. **Does it prefer the held-out chosen responses?** Accuracy, reward margins, DPO loss and
   log-probs on held-out pairs, with the training loop's own pieces (``read_examples``,
   ``make_collate``, ``batch_logps``, ``compute_objective``). The implicit reward of a
   response is ``beta * (log p_model - log p_ref)`` (Rafailov et al. 2023, eq. 5). Without a
   reference model the accuracy is the model's *raw log-prob preference*
   (``log p(chosen) > log p(rejected)``), and the result says so. A held-out file of response groups
   (:mod:`preftune.evaluation.ranking`) gets the same metrics over its groups' ordered pairs, each group
   one forward; pairs and groups alike get the ranking accuracy and Kendall's tau-b of the implicit
   rewards against the labels and the chosen (a group's best) response's log-prob change vs the base.
2. **Did it forget?** Mean NLL per completion token of the chosen responses (a group's best; or of
   an SFT file, ``nll_data``) under the model and under the base, and the difference.
3. **How far did it move?** KL(model || base) per sequence, Monte-Carlo on the model's own
   samples (:func:`preftune.evaluation.sampling.estimate_kl`'s estimator).
4. **Is it better?** The win rate of the model's samples over the base's under a judge, with
   a 95 % Wilson interval and the judge's tie / inconsistent / unparseable / error counts.

Everything runs without grad, in eval mode, in one process. The base's share can be kept in a
:class:`~preftune.evaluation.base_cache.BaseCache`; :mod:`preftune.evaluation.report_table` prints
the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from preftune.config.eval_config import EvalConfig
from preftune.data.load import read_examples
from preftune.evaluation.base_cache import BaseCache
from preftune.evaluation.judges.base import Judge, Prompt, ScoringJudge, compare_scores, prompt_text
from preftune.evaluation.judges.registry import make_judge
from preftune.evaluation.judges.reward_model import RewardModelJudge
from preftune.evaluation.prompts import read_prompts
from preftune.evaluation.ranking import (
    group_preference_metrics,
    group_table,
    preference_summary,
    reward_model_preference,
)
from preftune.evaluation.sampling import sample, sample_and_kl
from preftune.methods.objective import compute_objective
from preftune.model.loading import is_reward_model_folder, load_model, load_tokenizer
from preftune.model.logprobs import LogpOutput, batch_logps
from preftune.model.packing import make_collate, model_row_cost, packing_decision
from preftune.model.precision import resolve_compute_dtype
from preftune.training.reference import check_separate, examples_fingerprint, tokenizer_fingerprint

log = logging.getLogger("preftune")

RAW_PREFERENCE = "none: raw log-prob preference (chosen logp > rejected logp)"


def evaluate_model(cfg: EvalConfig, judge: Judge | None = None) -> dict:
    """Metrics of ``cfg.model`` on the held-out pairs or groups ``cfg.data``, against ``cfg.ref_model`` when given.

    ``cfg`` is validated first (:meth:`EvalConfig.validate`: ranges and combinations, before any
    model is loaded). ``judge``: a Judge object used instead of the spec ``cfg.judge``. A reward
    model (:func:`evaluate_reward_model`) is evaluated on the held-out preferences only. With
    ``cfg.base_cache`` the base's share of the work is kept in that file (:class:`BaseCache`) for the
    next evaluation against the same base; the results are the same with or without it.

    Returns a JSON-ready dict: ``preference``, ``nll``, ``generation`` (None when not asked),
    plus ``model``, ``reference``, ``data``, the settings and, with ``base_cache``, ``base_cache``
    (which entries were reused, which computed). See :func:`preftune.evaluation.report_table.format_table`.
    """
    cfg.validate(judge_given=judge is not None)
    if judge is None and cfg.judge is not None:  # fail fast, before loading models
        judge = make_judge(cfg.judge, **({"mixed_precision": cfg.mixed_precision}  # a reward model judges in
                                         if cfg.judge.startswith("reward-model:") else {}))  # our precision
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_reward_model_folder(cfg.model):
        if cfg.ref_model is not None or cfg.generate or cfg.nll_data is not None:
            raise ValueError(f"{cfg.model} is a reward model: it is evaluated on held-out pairs only (no "
                             "--ref-model, --generate or --nll-data); use it as --judge reward-model:PATH instead")
        return evaluate_reward_model(cfg, device)
    compute = resolve_compute_dtype(cfg.mixed_precision, device)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model, base = load_models(cfg, device)
    packing = cfg.packing and packing_decision(model, base)[0]
    row_cost = model_row_cost(model)
    # without a base the model is the cache's base: its held-out log-probs are the entries the evaluations
    # against it read back (a recipe's raw-preference evaluation of the base fills them for the sweep after it)
    cache = BaseCache(cfg.base_cache, model if base is None else base) if cfg.base_cache is not None else None
    # what the base's numbers depend on besides its weights and the inputs (BaseCache keys)
    layout = {"batch_size": cfg.batch_size, "packing": packing, "row_cost": row_cost,
              "logit_chunk_size": cfg.logit_chunk_size, "dtype": cfg.dtype, "compute_dtype": str(compute),
              "device": device.type}

    result = {"model": cfg.model, "reference": cfg.ref_model if cfg.ref_model is not None else RAW_PREFERENCE,
              "data": cfg.data, "settings": {"beta": cfg.beta, "max_length": cfg.max_length,
                                             "max_prompt_length": cfg.max_prompt_length, "dtype": cfg.dtype,
                                             "compute_dtype": str(compute or "weights' dtype").replace("torch.", "")}}
    held_out = read_preferences(cfg, tokenizer)
    groups = held_out[0].scores is not None
    collate = make_collate(tokenizer.pad_token_id, packing, row_cost=row_cost)
    score = group_preference_metrics if groups else preference_metrics
    result["preference"], best = score(model, base, held_out, collate, cfg, device, compute, cache, layout)

    if cfg.nll_data is None:  # the chosen (a group's best) responses: read from the preference pass's log-probs
        result["nll"] = nll_from_logps(*best)
    else:
        sft_examples = read_held_out(cfg, tokenizer, cfg.nll_data, "sft")
        result["nll"] = nll_metrics(model, base, sft_examples, make_collate(tokenizer.pad_token_id, packing),
                                    cfg, device, compute, cache, layout)
    result["nll"]["data"] = (cfg.nll_data if cfg.nll_data else
                             f"{'best' if groups else 'chosen'} responses of {cfg.data}")

    result["generation"] = None
    if cfg.generate:
        prompts = read_prompts(cfg.data, limit=cfg.generate)
        result["generation"] = generation_metrics(model, base, tokenizer, prompts, judge, cfg, compute_dtype=compute,
                                                  cache=cache, layout=layout)
    if cache is not None:
        result["base_cache"] = cache.summary()
    return result


def load_models(cfg: EvalConfig, device: torch.device):
    """The model to evaluate and the base (None without ``cfg.ref_model``), in eval mode on ``device``;
    the base must not share weights with the model."""
    model = load_model(cfg.model, cfg.dtype, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    base = None
    if cfg.ref_model is not None:
        base = load_model(cfg.ref_model, cfg.dtype, trust_remote_code=cfg.trust_remote_code).to(device).eval()
        check_separate(model, base)
    return model, base


def read_held_out(cfg: EvalConfig, tokenizer, source: str, kind: str) -> list:
    """Tokenized held-out examples of ``source`` read as ``kind`` (``pair`` for the preference metrics,
    ``sft`` for the NLL: a pair file's chosen side) with the training data path's lengths, at most
    ``cfg.max_examples``; the report is logged."""
    examples, _ = read_examples(tokenizer, source, True, kind=kind, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, limit=cfg.max_examples)
    return examples


def read_preferences(cfg: EvalConfig, tokenizer) -> list:
    """The held-out preferences of ``cfg.data``: pairs, or response groups when the file holds any
    group (its pair rows then read as groups of two scored 1 and 0, as training reads such a file)."""
    examples = read_held_out(cfg, tokenizer, cfg.data, "pair")  # a group row read as "pair" is a group
    if any(ex.scores is not None for ex in examples) and any(ex.scores is None for ex in examples):
        examples = read_held_out(cfg, tokenizer, cfg.data, "group")
    return examples


# ----------------------------------------------------------------------------- reward models


def evaluate_reward_model(cfg: EvalConfig, device: torch.device) -> dict:
    """A reward model's held-out accuracy, reward(chosen) > reward(rejected) (a group's better > worse
    response of each ordered pair), ranking accuracy and Kendall's tau-b, on the training data path (the
    same tokens, collate and head read as ``preftune train --loss reward``;
    :func:`preftune.evaluation.ranking.reward_model_preference`)."""
    compute = resolve_compute_dtype(cfg.mixed_precision, device)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_model(cfg.model, cfg.dtype, trust_remote_code=cfg.trust_remote_code, head="reward").to(device).eval()
    packing = cfg.packing and packing_decision(model)[0]
    collate = make_collate(tokenizer.pad_token_id, packing, row_cost=model_row_cost(model))
    examples = read_preferences(cfg, tokenizer)
    rewards = group_table(model, examples, collate, cfg, device, compute, rewards=True)[0]  # (G, K)
    return {"model": cfg.model, "kind": "reward", "reference": "none: a reward model", "data": cfg.data,
            "settings": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "dtype": cfg.dtype},
            "preference": reward_model_preference(rewards, examples), "nll": None, "generation": None}


# ----------------------------------------------------------------------------- held-out pairs


@torch.no_grad()
def pair_logps(model, examples, collate, cfg: EvalConfig, device, compute=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(2N,) float32 summed log-probs of held-out pairs, every chosen response then every rejected
    one, and their (2N,) completion-token counts: the training loop's batches and ``batch_logps``."""
    parts = []
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start:start + cfg.batch_size]).to(device)
        out = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size, compute_dtype=compute)
        G = batch.num_groups  # sequence s = k * G + g: chosen first, then rejected
        parts.append((out.logps.view(2, G), out.counts.view(2, G)))
    logps = torch.cat([p for p, _ in parts], dim=1).reshape(-1).float().cpu()
    return logps, torch.cat([c for _, c in parts], dim=1).reshape(-1).cpu()


def pair_counts(examples, collate, cfg: EvalConfig) -> torch.Tensor:
    """(2N,) completion-token counts of held-out pairs in :func:`pair_logps`'s order, from the batches alone
    (no forward): what ``batch_logps`` counts, each sequence's target tokens."""
    parts = []
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start:start + cfg.batch_size])
        G = batch.num_groups
        parts.append(torch.bincount(batch.token_seq.cpu(), minlength=2 * G).view(2, G))
    return torch.cat(parts, dim=1).reshape(-1)


@torch.no_grad()
def preference_metrics(model, base, examples, collate, cfg: EvalConfig, device, compute=None,
                       cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """DPO metrics over all held-out pairs at once (exact means, not means of batch means), with the
    ranking metrics of :func:`preference_summary` (a pair is a group of two scored 1 and 0) -> ``(metrics,
    (chosen log-probs (N,), the base's (N,) or None, chosen token counts (N,)))``: the chosen side's numbers
    serve :func:`nll_from_logps`."""
    def cached_logps(which) -> torch.Tensor:  # the base's (2N,) log-probs, kept in the base cache
        return torch.tensor(cache.get_or_compute(
            "held-out pair log-probs", {"examples": examples_fingerprint(examples), **(layout or {})},
            lambda: pair_logps(which, examples, collate, cfg, device, compute)[0].tolist()), dtype=torch.float32)

    if base is None and cache is not None:  # the model is the cache's base (evaluate_model)
        logps, counts = cached_logps(model), pair_counts(examples, collate, cfg)
    else:
        logps, counts = pair_logps(model, examples, collate, cfg, device, compute)
    n = len(examples)
    if base is None:
        # No reference: log p_ref = 0, so the implicit reward is beta * log p and the accuracy
        # is the raw preference chosen logp > rejected logp.
        ref_logps = torch.zeros_like(logps)
    elif cache is None:
        ref_logps = pair_logps(base, examples, collate, cfg, device, compute)[0]
    else:
        ref_logps = cached_logps(base)
    _, metrics = compute_objective("dpo", LogpOutput(logps, counts, logps.new_zeros(0)), n,
                                   ref_logps=ref_logps, beta=cfg.beta)
    scores = torch.tensor([[1.0, 0.0]]).expand(n, 2)
    out = {"pairs": n, "groups": None, **preference_summary(metrics, logps.view(2, n).t(), ref_logps.view(2, n).t(),
                                                           scores, None, cfg, base is not None)}
    out["accuracy_definition"] = ("beta * (logp_model - logp_ref): chosen > rejected" if base is not None else
                                  "raw log-prob preference: logp(chosen) > logp(rejected) (no reference model given)")
    return out, (logps[:n], ref_logps[:n] if base is not None else None, counts[:n])


@torch.no_grad()
def total_nll(model, examples, collate, cfg: EvalConfig, device, compute=None) -> tuple[float, int]:
    """Summed NLL of the completion tokens of SFT ``examples`` under ``model``, and their count."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start:start + cfg.batch_size]).to(device)
        out = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size, compute_dtype=compute)  # (G,), K = 1
        total -= float(out.logps.sum())
        tokens += int(out.counts.sum())
    return total, tokens


def nll_from_logps(logps: torch.Tensor, base_logps: torch.Tensor | None, counts: torch.Tensor) -> dict:
    """:func:`nll_metrics` of held-out responses whose summed log-probs under the model (and the base, or None)
    and token counts (each (N,)) are known: the preference pass's chosen responses (a group's best), so the NLL
    costs no forward of its own. A response is scored the same inside its pair's packed forward as alone (the
    packing tests' equality)."""
    base_total = None if base_logps is None else -float(base_logps.double().sum())
    return nll_result(-float(logps.double().sum()), base_total, int(counts.sum()), len(counts))


def nll_result(model_total: float, base_total: float | None, tokens: int, sequences: int) -> dict:
    """The NLL dict from summed NLLs over ``tokens`` completion tokens: per-token means and their difference."""
    model_nll = model_total / tokens
    base_nll = None if base_total is None else base_total / tokens
    return {"tokens": tokens, "sequences": sequences, "model": model_nll, "base": base_nll,
            "difference": model_nll - base_nll if base_nll is not None else None}


@torch.no_grad()
def nll_metrics(model, base, examples, collate, cfg: EvalConfig, device, compute=None,
                cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """Mean NLL per completion token (token-weighted over the file) under model and base."""
    model_total, tokens = total_nll(model, examples, collate, cfg, device, compute)
    total = None
    if base is not None:
        def base_total() -> float:
            return total_nll(base, examples, collate, cfg, device, compute)[0]

        total = (base_total() if cache is None else cache.get_or_compute(
            "NLL", {"examples": examples_fingerprint(examples), **(layout or {})}, base_total))
    return nll_result(model_total, total, tokens, len(examples))


# ----------------------------------------------------------------------------- generation


def generation_metrics(model, base, tokenizer, prompts: Sequence[Prompt], judge: Judge | None, cfg: EvalConfig,
                       compute_dtype=None, cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """Sample model and base on ``prompts``; KL(model || base) and the model's win rate under ``judge``.

    Both sample with the same seed (``cfg``'s sampling settings: ``max_new_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``batch_size``, ``kl_samples``). The KL is estimated on samples drawn at
    temperature 1 and top-p 1 (the model's own distribution); with those settings and
    ``kl_samples == 1`` the judged samples are reused, which gives exactly
    :func:`preftune.evaluation.sampling.estimate_kl`.
    """
    max_new_tokens, temperature, top_p, seed = cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed
    batch_size, kl_samples = cfg.batch_size, cfg.kl_samples
    common = dict(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, compute_dtype=compute_dtype)
    # the base's and a reward-model judge's prompt states are kept beside the base cache: every variant of a
    # sweep is scored on the same prompts, which then run once per model (preftune.evaluation.prompt_states)
    states_dir = cache.states_dir if cache is not None else None
    model_texts, (kl, kl_stderr) = sample_and_kl(model, base, tokenizer, prompts, kl_samples, temperature=temperature,
                                                 top_p=top_p, states_dir=states_dir, **common)

    def base_samples() -> list[str]:
        return [texts[0] for texts in sample(base, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                             **common)]

    base_texts = base_samples() if cache is None else cache.get_or_compute(
        "samples", {"prompts": list(prompts),
                    "tokenizer": tokenizer_fingerprint(tokenizer), "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "seed": seed, **(layout or {})}, base_samples)
    out = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
           "seed": seed, "kl": kl, "kl_stderr": None if math.isnan(kl_stderr) else kl_stderr,
           "kl_samples": len(prompts) * kl_samples, "judge": None, "win_rate": None,
           "samples": [{"prompt": prompt_text(p), "model": a, "base": b}
                       for p, a, b in zip(prompts, model_texts, base_texts)]}
    if judge is None:
        return out
    scores_model = scores_base = None
    if isinstance(judge, ScoringJudge):
        # Scored in two calls, base's then model's, with or without a cache: the base's scores are a
        # function of the base's samples and the judge alone, so a cached evaluation equals an uncached one.
        if isinstance(judge, RewardModelJudge) and states_dir is not None:
            judge.states_dir = states_dir
        parts = judge.cache_parts()

        def base_scores() -> list[float]:
            return judge.score(list(prompts), base_texts)

        scores_base = (base_scores() if cache is None or parts is None else cache.get_or_compute(
            "judge scores", {"prompts": list(prompts), "responses": base_texts, **parts}, base_scores))
        # a reply the base gave word for word is not scored again: it has the base's score (a tie, whatever
        # the batch it would be scored in)
        other = [i for i, (a, b) in enumerate(zip(model_texts, base_texts)) if a != b]
        scored = judge.score([prompts[i] for i in other], [model_texts[i] for i in other]) if other else []
        scores_model = list(scores_base)
        for i, value in zip(other, scored):
            scores_model[i] = value
        compared = compare_scores(scores_model, scores_base)
    else:
        compared = judge.compare(list(prompts), model_texts, base_texts)
    rate = compared.win_rate(0.95)
    out["judge"] = judge.spec or repr(judge)
    out["win_rate"] = {"rate": rate.rate, "low": rate.low, "high": rate.high, "confidence": 0.95, "n": rate.n,
                       "wins": rate.wins, "losses": rate.losses, "ties": compared.ties,
                       "inconsistent": compared.inconsistent, "unparseable": compared.unparseable,
                       "errors": compared.errors}
    if scores_model is not None:
        out["score_model"] = sum(scores_model) / len(scores_model)
        out["score_base"] = sum(scores_base) / len(scores_base)
    return out
