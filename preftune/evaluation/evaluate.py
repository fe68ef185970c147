"""Evaluate a model against its base: held-out preferences, NLL regression, KL and win rate.

:func:`evaluate_model` answers four questions about ``model`` (usually a trained run folder)
and ``ref_model`` (the base it started from):

1. **Does it prefer the held-out chosen responses?** Accuracy, reward margins, DPO loss and
   log-probs on held-out pairs, with the training loop's own pieces (``read_examples``,
   ``make_collate``, ``batch_logps``, ``compute_objective``). The implicit reward of a
   response is ``beta * (log p_model - log p_ref)`` (Rafailov et al. 2023, eq. 5). Without a
   reference model the accuracy is the model's *raw log-prob preference*
   (``log p(chosen) > log p(rejected)``), and the result says so.
2. **Did it forget?** Mean NLL per completion token of the chosen responses (or of an SFT
   file, ``nll_data``) under the model and under the base, and the difference.
3. **How far did it move?** KL(model || base) per sequence, Monte-Carlo on the model's own
   samples (:func:`preftune.evaluation.sampling.estimate_kl`'s estimator).
4. **Is it better?** The win rate of the model's samples over the base's under a judge, with
   a 95 % Wilson interval and the judge's tie / inconsistent / unparseable / error counts.

Everything runs without grad, in eval mode, in one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from preftune.common.files import json_safe, write_atomic
from preftune.config.train_config import TrainConfig
from preftune.data.errors import DataError
from preftune.data.formats import is_pair_row, to_example
from preftune.data.load import read_examples
from preftune.data.readers import read_rows
from preftune.data.records import Location
from preftune.evaluation.judges.base import Judge, Prompt, ScoringJudge, compare_scores, prompt_text
from preftune.evaluation.judges.registry import make_judge
from preftune.evaluation.metrics import kl_from_samples, wilson_interval
from preftune.evaluation.pairs import best_vs_worst_pairs
from preftune.evaluation.sampling import estimate_kl, sample, sample_from_path, sample_token_ids
from preftune.evaluation.scoring import completion_logps
from preftune.methods.objective import compute_objective
from preftune.model.loading import is_reward_model_folder, load_model, load_tokenizer
from preftune.model.logprobs import LogpOutput, batch_logps
from preftune.model.packing import make_collate, model_row_cost, supports_packing
from preftune.model.precision import resolve_compute_dtype
from preftune.training.reference import check_separate, examples_fingerprint, tokenizer_fingerprint

log = logging.getLogger("preftune")

RAW_PREFERENCE = "none: raw log-prob preference (chosen logp > rejected logp)"


def evaluate_model(model_path: str | os.PathLike, data: str | os.PathLike, ref_model: str | os.PathLike | None = None,
                   nll_data: str | os.PathLike | None = None, generate: int = 0, judge: str | Judge | None = None,
                   max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 8, max_length: int = 1024, max_prompt_length: int | None = None, beta: float = 0.1,
                   kl_samples: int = 1, max_examples: int | None = None, dtype: str = "float32",
                   packing: bool = True, logit_chunk_size: int = 1024, trust_remote_code: bool = False,
                   device: str | None = None, mixed_precision: str = "no",
                   base_cache: str | os.PathLike | None = None) -> dict:
    """Metrics of ``model_path`` on held-out pairs ``data``, against ``ref_model`` when given.

    Args:
        model_path, ref_model: model folders or hub names (the tokenizer is the model's).
        data: held-out preference pairs in any format ``preftune train`` reads.
        nll_data: an SFT file for the NLL regression check (default: the chosen side of ``data``).
        generate: sample one response to each of the first N prompts of ``data`` from model and
            base; estimate KL(model || base) and, with ``judge``, the model's win rate. Needs ``ref_model``.
        judge: a :func:`preftune.evaluation.judges.registry.make_judge` spec or a Judge.
        kl_samples: samples per prompt for the KL estimate (always drawn at temperature 1, top-p 1).
        beta: scale of the implicit reward (accuracy does not depend on it; margins and loss do).
        mixed_precision: ``no``, ``bf16``, ``fp16`` or ``auto`` (bf16 where the device runs it fast), as
            ``preftune train --mixed-precision``: the forwards and sampling autocast to it, log-softmax fp32.
        base_cache: a JSON file (:class:`BaseCache`) that keeps the base's share of the work (its
            held-out log-probs, NLL, samples and their reward-model scores) for the next evaluation
            against the same base: a sweep's variants compute it once. The results are the same with
            or without it.

    Returns a JSON-ready dict: ``preference``, ``nll``, ``generation`` (None when not asked),
    plus ``model``, ``reference``, ``data``, the settings and, with ``base_cache``, ``base_cache``
    (which entries were reused, which computed). See :func:`format_table`.
    """
    if generate and ref_model is None:
        raise ValueError("--generate compares samples of the model with the base's: it needs --ref-model")
    if base_cache is not None and ref_model is None:
        raise ValueError("--base-cache keeps the base model's results: it needs --ref-model")
    if judge is not None and not generate:
        raise ValueError("--judge is used on generated samples: also pass --generate N")
    if generate < 0 or kl_samples < 1:
        raise ValueError(f"need generate >= 0 and kl_samples >= 1, got {generate} and {kl_samples}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    if isinstance(judge, str):  # fail fast, before loading models; a reward model judges in our precision
        judge = make_judge(judge, **({"mixed_precision": mixed_precision} if judge.startswith("reward-model:")
                                     else {}))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_reward_model_folder(model_path):
        if ref_model is not None or generate or nll_data is not None:
            raise ValueError(f"{model_path} is a reward model: it is evaluated on held-out pairs only (no "
                             "--ref-model, --generate or --nll-data); use it as --judge reward-model:PATH instead")
        return evaluate_reward_model(model_path, data, batch_size=batch_size, max_length=max_length,
                                     max_prompt_length=max_prompt_length, max_examples=max_examples, dtype=dtype,
                                     packing=packing, trust_remote_code=trust_remote_code, device=device,
                                     mixed_precision=mixed_precision)
    compute = resolve_compute_dtype(mixed_precision, device)
    cfg = TrainConfig(model=str(model_path), loss="dpo", beta=beta, batch_size=batch_size, max_length=max_length,
                      max_prompt_length=max_prompt_length, max_examples=max_examples, dtype=dtype,
                      logit_chunk_size=logit_chunk_size, trust_remote_code=trust_remote_code).validate(require_io=False)

    tokenizer = load_tokenizer(str(model_path), trust_remote_code)
    model = load_model(str(model_path), dtype, trust_remote_code=trust_remote_code).to(device).eval()
    base = None
    if ref_model is not None:
        base = load_model(str(ref_model), dtype, trust_remote_code=trust_remote_code).to(device).eval()
        check_separate(model, base)
    packing = packing and supports_packing(model)[0] and (base is None or supports_packing(base)[0])
    row_cost = model_row_cost(model)
    collate = make_collate(tokenizer.pad_token_id, packing, cfg.pack_tokens, cfg.train_on_prompt, row_cost)
    cache = BaseCache(base_cache, base) if base_cache is not None else None  # base_cache needs ref_model: checked
    # what the base's numbers depend on besides its weights and the inputs (BaseCache keys)
    layout = {"batch_size": batch_size, "packing": packing, "row_cost": row_cost,
              "logit_chunk_size": logit_chunk_size, "dtype": dtype, "compute_dtype": str(compute),
              "device": device.type}

    pairs, _ = read_examples(tokenizer, str(data), True, kind=cfg.kind, max_length=cfg.max_length,
                             max_prompt_length=cfg.max_prompt_length, skip_bad_records=cfg.skip_bad_records,
                             limit=cfg.max_examples, kl_partners=cfg.method.kl_partners, seed=cfg.seed)
    result = {"model": str(model_path), "reference": str(ref_model) if ref_model is not None else RAW_PREFERENCE,
              "data": str(data), "settings": {"beta": beta, "max_length": max_length,
                                              "max_prompt_length": max_prompt_length, "dtype": dtype}}
    result["settings"]["compute_dtype"] = str(compute or "weights' dtype").replace("torch.", "")
    result["preference"] = preference_metrics(model, base, pairs, collate, cfg, device, compute, cache, layout)

    sft_cfg = TrainConfig(**{**cfg.to_dict(), "loss": "sft"})
    sft_examples, _ = read_examples(tokenizer, str(nll_data or data), True, kind=sft_cfg.kind,
                                    max_length=sft_cfg.max_length, max_prompt_length=sft_cfg.max_prompt_length,
                                    skip_bad_records=sft_cfg.skip_bad_records, limit=sft_cfg.max_examples,
                                    kl_partners=sft_cfg.method.kl_partners, seed=sft_cfg.seed)
    sft_collate = make_collate(tokenizer.pad_token_id, packing, sft_cfg.pack_tokens, sft_cfg.train_on_prompt)
    result["nll"] = nll_metrics(model, base, sft_examples, sft_collate,
                                cfg, device, compute, cache, layout)
    result["nll"]["data"] = str(nll_data) if nll_data else f"chosen responses of {data}"

    result["generation"] = None
    if generate:
        prompts = read_prompts(data, limit=generate)
        result["generation"] = generation_metrics(
            model, base, tokenizer, prompts, judge, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, batch_size=batch_size, kl_samples=kl_samples, compute_dtype=compute,
            cache=cache, layout=layout)
    if cache is not None:
        result["base_cache"] = cache.summary()
    return result


# ----------------------------------------------------------------------------- reward models


def evaluate_reward_model(model_path, data, batch_size: int = 8, max_length: int = 1024,
                          max_prompt_length: int | None = None, max_examples: int | None = None,
                          dtype: str = "float32", packing: bool = True, trust_remote_code: bool = False,
                          device=None, mixed_precision: str = "no") -> dict:
    """A reward model's held-out pair accuracy: reward(chosen) > reward(rejected), on the training
    data path (the same tokens, collate and head read as ``preftune train --loss reward``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = resolve_compute_dtype(mixed_precision, device)
    cfg = TrainConfig(model=str(model_path), loss="reward", batch_size=batch_size, max_length=max_length,
                      max_prompt_length=max_prompt_length, max_examples=max_examples, dtype=dtype,
                      trust_remote_code=trust_remote_code).validate(require_io=False)
    tokenizer = load_tokenizer(str(model_path), trust_remote_code)
    model = load_model(str(model_path), dtype, trust_remote_code=trust_remote_code, head="reward").to(device).eval()
    packing = packing and supports_packing(model)[0]
    collate = make_collate(tokenizer.pad_token_id, packing, cfg.pack_tokens, cfg.train_on_prompt,
                           model_row_cost(model))
    pairs, _ = read_examples(tokenizer, str(data), True, kind=cfg.kind, max_length=cfg.max_length,
                             max_prompt_length=cfg.max_prompt_length, skip_bad_records=cfg.skip_bad_records,
                             limit=cfg.max_examples, kl_partners=cfg.method.kl_partners, seed=cfg.seed)
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start:start + batch_size]).to(device)
            rewards = batch_logps(model, batch, compute_dtype=compute).rewards.float().cpu()  # (2G,) chosen, rejected
            chosen.append(rewards[:batch.num_groups])
            rejected.append(rewards[batch.num_groups:])
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    n = len(pairs)
    accuracy = float((rc > rr).float().mean())
    low, high = wilson_interval(accuracy, n)
    return {"model": str(model_path), "kind": "reward", "reference": "none: a reward model", "data": str(data),
            "settings": {"max_length": max_length, "max_prompt_length": max_prompt_length, "dtype": dtype},
            "preference": {"pairs": n, "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high,
                           "accuracy_definition": "reward(chosen) > reward(rejected) (reward model)",
                           "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
                           "reward_margin": float((rc - rr).mean()), "logps_chosen": None, "logps_rejected": None,
                           "logp_margin": None, "dpo_loss": None, "beta": None,
                           "bt_loss": float(torch.nn.functional.softplus(rr - rc).mean())},
            "nll": None, "generation": None}


# ----------------------------------------------------------------------------- the base's share, cached


class BaseCache:
    """What an evaluation computes on the base alone, kept in one JSON file for the next evaluation.

    Every variant of a sweep is evaluated against the same base on the same held-out data, and a
    third of that work is the base's: its log-probs of the held-out pairs (the reference side of
    the implicit reward), its NLL on the NLL data, its samples and a scoring judge's scores of them
    (a reward model's; :meth:`preftune.evaluation.judges.base.ScoringJudge.cache_parts`). Those depend only on the base,
    the data and the settings, never on the variant, so :func:`evaluate_model` with ``base_cache``
    computes each once and reads it back afterwards. An entry's key hashes everything it depends
    on: every weight of the base (:func:`preftune.training.reference.weights_fingerprint`), the tokenized
    examples or prompts, the batch layout (batch size, packing, logit chunk), the compute dtype,
    the device type and the torch version, for samples the sampling settings and seed, and for judge
    scores the judge's weights and settings; a changed input is a new key, never a stale value.
    Values read back are exactly the computed ones (floats round-trip through JSON), so a cached
    evaluation equals an uncached one.
    ``reused`` lists the entries read back, ``stored`` those computed and written.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike, base):
        self.path = Path(path)
        self.base = base
        self._weights: str | None = None
        self.reused: list[str] = []
        self.stored: list[str] = []

    def _entries(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("base cache %s unreadable (%s): computing again", self.path, exc)
            return {}
        return raw.get("entries", {}) if raw.get("version") == self.VERSION else {}

    def key(self, kind: str, parts: dict) -> str:
        from preftune.training.reference import weights_fingerprint

        if self._weights is None:
            self._weights = weights_fingerprint(self.base)
        text = json.dumps({"kind": kind, "weights": self._weights, "torch": torch.__version__, **parts},
                          sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def get_or_compute(self, kind: str, parts: dict, compute):
        """The cached value of (kind, parts), else ``compute()`` stored under that key."""
        key = self.key(kind, parts)
        entry = self._entries().get(key)
        if entry is not None:
            self.reused.append(kind)
            log.info("base cache: reusing the base's %s (%s)", kind, self.path)
            return entry["value"]
        value = compute()
        entries = self._entries()  # read again: another evaluation may have written since
        entries[key] = {"kind": kind, "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"version": self.VERSION, "entries": entries}))
        self.stored.append(kind)
        return value

    def summary(self) -> dict:
        return {"path": str(self.path), "reused": list(self.reused), "stored": list(self.stored)}


# ----------------------------------------------------------------------------- held-out pairs


@torch.no_grad()
def pair_logps(model, examples, collate, cfg: TrainConfig, device, compute=None) -> tuple[torch.Tensor, torch.Tensor]:
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


@torch.no_grad()
def preference_metrics(model, base, examples, collate, cfg: TrainConfig, device, compute=None,
                       cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """DPO metrics over all held-out pairs at once (exact means, not means of batch means)."""
    logps, counts = pair_logps(model, examples, collate, cfg, device, compute)
    n = len(examples)
    if base is None:
        # No reference: log p_ref = 0, so the implicit reward is beta * log p and the accuracy
        # is the raw preference chosen logp > rejected logp.
        ref_logps = torch.zeros_like(logps)
    elif cache is None:
        ref_logps = pair_logps(base, examples, collate, cfg, device, compute)[0]
    else:
        ref_logps = torch.tensor(cache.get_or_compute(
            "held-out pair log-probs", {"examples": examples_fingerprint(examples), **(layout or {})},
            lambda: pair_logps(base, examples, collate, cfg, device, compute)[0].tolist()), dtype=torch.float32)
    _, metrics = compute_objective("dpo", LogpOutput(logps, counts, logps.new_zeros(0)), n,
                                   ref_logps=ref_logps, beta=cfg.beta)
    m = {k: float(v) for k, v in metrics.items()}
    out = {"pairs": n, "accuracy": m["rewards/accuracies"],
           "logps_chosen": m["logps/chosen"], "logps_rejected": m["logps/rejected"],
           "logp_margin": m["logps/chosen"] - m["logps/rejected"]}
    if base is not None:
        out.update(accuracy_definition="beta * (logp_model - logp_ref): chosen > rejected",
                   reward_chosen=m["rewards/chosen"], reward_rejected=m["rewards/rejected"],
                   reward_margin=m["rewards/margins"], dpo_loss=m["loss"], beta=cfg.beta)
    else:
        out.update(accuracy_definition="raw log-prob preference: logp(chosen) > logp(rejected) "
                                       "(no reference model given)",
                   reward_chosen=None, reward_rejected=None, reward_margin=None, dpo_loss=None, beta=None)
    return out


@torch.no_grad()
def total_nll(model, examples, collate, cfg: TrainConfig, device, compute=None) -> tuple[float, int]:
    """Summed NLL of the completion tokens of SFT ``examples`` under ``model``, and their count."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[start:start + cfg.batch_size]).to(device)
        out = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size, compute_dtype=compute)  # (G,), K = 1
        total -= float(out.logps.sum())
        tokens += int(out.counts.sum())
    return total, tokens


@torch.no_grad()
def nll_metrics(model, base, examples, collate, cfg: TrainConfig, device, compute=None,
                cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """Mean NLL per completion token (token-weighted over the file) under model and base."""
    model_total, tokens = total_nll(model, examples, collate, cfg, device, compute)
    model_nll = model_total / tokens
    base_nll = None
    if base is not None:
        def base_total() -> float:
            return total_nll(base, examples, collate, cfg, device, compute)[0]

        total = (base_total() if cache is None else cache.get_or_compute(
            "NLL", {"examples": examples_fingerprint(examples), **(layout or {})}, base_total))
        base_nll = total / tokens
    return {"tokens": tokens, "sequences": len(examples), "model": model_nll, "base": base_nll,
            "difference": model_nll - base_nll if base is not None else None}


# ----------------------------------------------------------------------------- generation


def generation_metrics(model, base, tokenizer, prompts: Sequence[Prompt], judge: Judge | None,
                       max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 8, kl_samples: int = 1, compute_dtype=None,
                       cache: BaseCache | None = None, layout: dict | None = None) -> dict:
    """Sample model and base on ``prompts``; KL(model || base) and the model's win rate under ``judge``.

    Both sample with the same seed. The KL is estimated on samples drawn at temperature 1 and
    top-p 1 (the model's own distribution); with those settings and ``kl_samples == 1`` the
    judged samples are reused, which gives exactly :func:`preftune.evaluation.sampling.estimate_kl`.
    """
    common = dict(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, compute_dtype=compute_dtype)
    if temperature == 1.0 and top_p == 1.0 and kl_samples == 1:
        prompt_ids, completion_ids = sample_token_ids(model, tokenizer, prompts, **common)
        pad_id = tokenizer.pad_token_id
        kl, kl_stderr = kl_from_samples(
            completion_logps(model, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype),
            completion_logps(base, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype))
        model_texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    else:
        kl, kl_stderr = estimate_kl(model, base, tokenizer, prompts, n_samples=kl_samples, **common)
        model_texts = [texts[0] for texts in sample(model, tokenizer, prompts, temperature=temperature,
                                                    top_p=top_p, **common)]
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
        # Scored in two calls, model's then base's, with or without a cache: the base's scores are a
        # function of the base's samples and the judge alone, so a cached evaluation equals an uncached one.
        scores_model = judge.score(list(prompts), model_texts)
        parts = judge.cache_parts()

        def base_scores() -> list[float]:
            return judge.score(list(prompts), base_texts)

        scores_base = (base_scores() if cache is None or parts is None else cache.get_or_compute(
            "judge scores", {"prompts": list(prompts), "responses": base_texts, **parts}, base_scores))
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


def read_prompts(source: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Prompts from a file, in order, at most ``limit``.

    * ``.txt``: one prompt per line (blank lines skipped; a prompt can't contain a newline:
      use JSONL for multi-line prompts);
    * anything ``preftune train`` reads (JSONL, JSON, Parquet, ...): the ``prompt`` field of
      each record (a string or a list of chat messages); records without one give the prompt
      of their pair (explicit or implicit, as in training) or of their SFT ``messages``.
    """
    source = os.fspath(source)
    prompts: list[Prompt] = []
    if source.lower().endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise DataError(Location(source), "no such file")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        return prompts[:limit] if limit is not None else prompts
    for location, row in read_rows(source):
        if limit is not None and len(prompts) >= limit:
            break
        prompt = row.get("prompt")
        if isinstance(prompt, (str, list)) and prompt:
            prompts.append(prompt)
        elif is_pair_row(row):
            prompts.append(to_example(row, location, "pair").prompt)
        elif row.get("messages") is not None:
            prompts.append(to_example(row, location, "sft").prompt)
        else:
            raise DataError(location, "no prompt: a record needs a 'prompt' field, a chosen/rejected pair, "
                                      "or 'messages'")
    if not prompts:
        raise DataError(Location(source), "no prompts")
    return prompts


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


# ----------------------------------------------------------------------------- output


def format_table(result: dict) -> str:
    """The result of :func:`evaluate_model` as a plain-text table (one metric a line)."""
    pref, nll, gen = result["preference"], result["nll"], result.get("generation")
    if result.get("kind") == "reward":
        rows = [("reward model", result["model"]), ("held-out pairs", f"{pref['pairs']} ({result['data']})"),
                ("pair accuracy", f"{pref['accuracy']:.4f} [{pref['accuracy_low']:.3f}, {pref['accuracy_high']:.3f}]"
                                  f" 95% CI   [{pref['accuracy_definition']}]"),
                ("reward chosen / rejected", f"{pref['reward_chosen']:+.4f} / {pref['reward_rejected']:+.4f}"),
                ("reward margin", f"{pref['reward_margin']:+.4f}"),
                ("Bradley-Terry loss", f"{pref['bt_loss']:.4f}")]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    rows = [("model", result["model"]), ("reference", result["reference"]),
            ("held-out pairs", f"{pref['pairs']} ({result['data']})"),
            ("preference accuracy", f"{pref['accuracy']:.4f}   [{pref['accuracy_definition']}]")]
    if pref["dpo_loss"] is not None:
        rows += [("reward margin", f"{pref['reward_margin']:+.4f}   (beta = {pref['beta']})"),
                 ("reward chosen / rejected", f"{pref['reward_chosen']:+.4f} / {pref['reward_rejected']:+.4f}"),
                 ("DPO loss", f"{pref['dpo_loss']:.4f}")]
    rows += [("logp chosen / rejected", f"{pref['logps_chosen']:.3f} / {pref['logps_rejected']:.3f}   "
                                        f"(margin {pref['logp_margin']:+.3f})"),
             ("NLL/token model", f"{nll['model']:.4f}   ({nll['tokens']} tokens of {nll['data']})")]
    if nll["base"] is not None:
        rows += [("NLL/token base", f"{nll['base']:.4f}"),
                 ("NLL difference", f"{nll['difference']:+.4f}   (model - base; > 0 = worse than the base)")]
    if gen:
        stderr = f" +- {gen['kl_stderr']:.3f}" if gen["kl_stderr"] is not None else ""
        rows.append(("KL(model || base)", f"{gen['kl']:.4f}{stderr} nats/sequence ({gen['kl_samples']} samples, "
                                          f"max {gen['max_new_tokens']} new tokens)"))
        wr = gen["win_rate"]
        if wr:
            rows.append(("win rate vs base", f"{wr['rate']:.3f} [{wr['low']:.3f}, {wr['high']:.3f}] 95% CI   "
                                             f"(n={wr['n']}: {wr['wins']} wins, {wr['losses']} losses, "
                                             f"{wr['ties']} ties; judge {gen['judge']})"))
            rows.append(("judge problems", f"inconsistent {wr['inconsistent']}, unparseable {wr['unparseable']}, "
                                           f"errors {wr['errors']} (each counted as a tie)"))
        if gen.get("score_model") is not None:
            rows.append(("judge score model / base", f"{gen['score_model']:.4f} / {gen['score_base']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def to_json(result: dict) -> str:
    """JSON text; non-finite floats become null (JSON has no NaN)."""
    return json.dumps(json_safe(result), indent=1)
