"""Sampling from a model, and the KL to a base measured on those samples.

* :func:`sample` — seeded, batched generation with a KV cache (:mod:`preftune.evaluation.decoding`)
  -> completion texts.
* :func:`sample_token_ids` — the same as token ids, one entry per sample.
* :func:`sample_scored` — token ids and each sample's log-prob under the sampling model.
* :func:`sample_and_kl` — one sample per prompt and the KL to a base, from the same samples where the
  sampling settings are the model's own distribution.
* :func:`sample_from_path` — load a model folder (or GGUF) and :func:`sample`.
* :func:`estimate_kl` — Monte-Carlo KL(model || base) on the model's own samples: the model's log-probs
  from the sampler, the base's by :func:`preftune.evaluation.scoring.completion_logps`.

Prompts are plain text, or chat message lists (``[{"role": ..., "content": ...}]``) rendered with
the tokenizer's chat template and ``add_generation_prompt=True``: a prompt is sampled on exactly the
ids it is trained and scored on (:func:`preftune.data.tokenize.prompt_token_ids`). The model is put
in eval mode for each call and given back in the mode it came in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from preftune.data.tokenize import prompt_token_ids, special_prefix_ids
from preftune.evaluation.decoding import decode_on_ranks, decode_scored
from preftune.evaluation.judges.base import Prompt
from preftune.evaluation.metrics import kl_from_samples
from preftune.evaluation.prompt_states import completion_logps_with_states, states_for
from preftune.evaluation.scoring import completion_logps, eval_mode, model_device, pad_token_id
from preftune.model.fast_decode import unsupported_reason
from preftune.model.loading import load_model, load_tokenizer
from preftune.model.packed_linear import packed_linears
from preftune.model.precision import autocast, resolve_compute_dtype


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS(s)."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; generation could not stop")
    return sorted(ids)


def sample(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           compute_dtype: torch.dtype | None = None, top_k: int = 0) -> list[list[str]]:
    """``n`` sampled completions per prompt, decoded with the prompt removed and special tokens skipped.

    Returns ``texts[i][j]``: the j-th completion of prompt i. Generation stops at EOS (the
    tokenizer's and the model's generation-config EOS ids) or after ``max_new_tokens``.
    ``temperature=0`` is greedy decoding. Sampling uses exactly ``temperature``, ``top_k`` (0: off)
    and ``top_p``: the model's own generation config (top-k, repetition penalty, ...) is not read.
    Sample ``i * n + j`` draws its randomness from its own generator seeded by ``(seed, i * n + j)``
    (:mod:`preftune.evaluation.decoding`), so results do not depend on ``batch_size``; the global RNG
    is not touched. ``compute_dtype`` (e.g. ``torch.bfloat16``) runs the forwards under
    ``torch.autocast`` to it (None: the weights' dtype); bf16 on a CPU multiplies by prepacked bf16
    weights (:mod:`preftune.model.packed_linear`, autocast's arithmetic).
    """
    _, completion_ids = sample_token_ids(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                         compute_dtype=compute_dtype, top_k=top_k)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def sample_token_ids(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                     compute_dtype: torch.dtype | None = None, top_k: int = 0,
                     state=None) -> tuple[list[list[int]], list[list[int]]]:
    """Like :func:`sample` but token ids: ``(prompt_ids, completion_ids)``, one entry per sample.

    Sample ``s = i * n + j`` is the j-th completion of prompt i. The prompt ids are
    :func:`prompt_token_ids` (the training path's). A completion keeps its final EOS when it
    has one (its probability is part of the sequence's), and nothing after. ``state`` (accelerate's
    ``PartialState`` / ``Accelerator`` of a multi-process run): each process samples a share and all
    get every sample, equal to one process's result (:func:`preftune.evaluation.decoding.decode_on_ranks`).
    """
    prompt_ids, completion_ids, _ = _sample(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p,
                                            seed, batch_size, compute_dtype, top_k, state, score=False)
    return prompt_ids, completion_ids


def sample_scored(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 64,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                  compute_dtype: torch.dtype | None = None, top_k: int = 0,
                  state=None) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """:func:`sample_token_ids` and ``(S,)`` float32: each completion's summed log-prob under ``model``,
    from the logits the sampler drew it with (log-softmax in float32 before temperature, top-k and top-p,
    :func:`preftune.evaluation.decoding.token_logps`). Equal, up to the arithmetic's rounding, to scoring the
    completion afterwards with :func:`preftune.evaluation.scoring.completion_logps`: within 1e-4 in float32;
    in bf16 the two paths (cached decode steps, one packed forward) round differently (``docs/evaluation.md``
    gives the difference measured on SmolLM2)."""
    prompt_ids, completion_ids, scores = _sample(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p,
                                                 seed, batch_size, compute_dtype, top_k, state, score=True)
    return prompt_ids, completion_ids, torch.tensor(scores, dtype=torch.float32)


def _sample(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, seed, batch_size, compute_dtype,
            top_k, state, score: bool) -> tuple[list[list[int]], list[list[int]], list[float] | None]:
    """:func:`sample_scored`'s work; the scores are None without ``score``."""
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1, got {n}, {batch_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0, got {temperature}, {top_p} "
                         f"and {top_k}")
    device = model_device(model)
    prefix = special_prefix_ids(tokenizer)
    prompt_ids = [ids for ids in (prompt_token_ids(tokenizer, p, prefix) for p in prompts) for _ in range(n)]
    # decode() batches prompts of similar length (longest first): a batch is left padded to its longest
    # prompt, and real prompts vary 10x in length (HH-RLHF: 30 to 500+ tokens). The lean forward
    # (preftune.model.fast_decode) packs its own weights; the Hugging Face forward gets packed linears.
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens if prompt_ids else 0
    lean = unsupported_reason(model, longest) is None
    packing = contextlib.nullcontext() if lean else packed_linears(model, compute_dtype, batch_size)
    with eval_mode(model), torch.no_grad(), autocast(device.type, compute_dtype), packing:
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
                       score=score)
        ends = (max_new_tokens, _eos_ids(model, tokenizer), pad_token_id(tokenizer))
        if state is not None and state.num_processes > 1:
            completion_ids, scores = decode_on_ranks(model, prompt_ids, *ends, state, **options)
        else:
            completion_ids, scores = decode_scored(model, prompt_ids, *ends, **options)
    return prompt_ids, completion_ids, scores


def estimate_kl(model, base, tokenizer, prompts: Sequence[Prompt], n_samples: int = 4, max_new_tokens: int = 64,
                seed: int = 0, batch_size: int = 8, compute_dtype: torch.dtype | None = None,
                states_dir: Path | None = None) -> tuple[float, float]:
    """Monte-Carlo KL(model || base) per sequence, in nats: ``(mean, stderr)``.

    Draws ``n_samples`` completions per prompt from ``model`` at temperature 1 and top-p 1
    (any other setting would not sample the model's own distribution), takes their log-probs under
    ``model`` from the sampler itself (:func:`sample_scored`), scores the sampled token ids (not
    re-tokenized text) under ``base`` with :func:`completion_logps`, and averages log p - log q
    with :func:`preftune.evaluation.metrics.kl_from_samples`. Completions cut at
    ``max_new_tokens`` estimate the KL of the distribution over such truncated sequences.
    ``model is base`` gives 0. ``compute_dtype`` is used for sampling and scoring alike. The base runs each
    prompt once (:mod:`preftune.evaluation.prompt_states`, Llama-family bases), its states kept in
    ``states_dir`` for the next estimate on the same prompts when given.
    """
    prompt_ids, completion_ids, policy_logps = sample_scored(model, tokenizer, prompts, n=n_samples,
                                                             max_new_tokens=max_new_tokens, seed=seed,
                                                             batch_size=batch_size, compute_dtype=compute_dtype)
    return _kl_on_samples(model, base, tokenizer, prompt_ids, completion_ids, policy_logps, batch_size, compute_dtype,
                          states_dir)


def _kl_on_samples(model, base, tokenizer, prompt_ids, completion_ids, model_logps: torch.Tensor, batch_size: int,
                   compute_dtype, states_dir: Path | None = None) -> tuple[float, float]:
    """KL(model || base) ``(mean, stderr)`` on the model's samples, given their (S,) log-probs under the model:
    the base scores the sampled ids (the model's own log-probs when it is the base) on its prompt states
    (:func:`preftune.evaluation.prompt_states.completion_logps_with_states`, kept in ``states_dir`` when
    given), or with :func:`completion_logps` where the lean forward does not run the base."""
    if base is model:
        return kl_from_samples(model_logps, model_logps)
    pad = pad_token_id(tokenizer)
    found = states_for(base, prompt_ids, batch_size, pad, compute_dtype, states_dir, "base")
    if found is None:
        base_logps = completion_logps(base, prompt_ids, completion_ids, pad, batch_size, compute_dtype)  # (S,)
    else:
        base_logps = completion_logps_with_states(*found, prompt_ids, completion_ids, batch_size)
    return kl_from_samples(model_logps, base_logps)


def sample_and_kl(model, base, tokenizer, prompts: Sequence[Prompt], kl_samples: int = 1, max_new_tokens: int = 64,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                  compute_dtype: torch.dtype | None = None, kl_seed: int | None = None,
                  states_dir: Path | None = None) -> tuple[list[str], tuple[float, float]]:
    """One completion text per prompt (``temperature``, ``top_p``, ``seed``) and KL(model || base) ``(mean,
    stderr)``. At temperature 1 and top-p 1 with ``kl_samples == 1`` the texts are the model's own
    distribution: the KL is estimated on them (one sampling, the model's log-probs from the sampler;
    exactly :func:`estimate_kl` at ``seed``). Otherwise the KL comes from :func:`estimate_kl`'s own
    ``kl_samples`` samples per prompt, drawn with ``kl_seed`` (default ``seed``)."""
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, compute_dtype=compute_dtype)
    if temperature == 1.0 and top_p == 1.0 and kl_samples == 1:
        prompt_ids, completion_ids, model_logps = sample_scored(model, tokenizer, prompts, seed=seed, **common)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return texts, _kl_on_samples(model, base, tokenizer, prompt_ids, completion_ids, model_logps, batch_size,
                                     compute_dtype, states_dir)
    kl = estimate_kl(model, base, tokenizer, prompts, n_samples=kl_samples,
                     seed=seed if kl_seed is None else kl_seed, states_dir=states_dir, **common)
    texts = [row[0] for row in sample(model, tokenizer, prompts, temperature=temperature, top_p=top_p, seed=seed,
                                      **common)]
    return texts, kl


def sample_from_path(model_path, prompts: Sequence[Prompt], n: int, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                     dtype: str = "float32", trust_remote_code: bool = False,
                     device: str | None = None, mixed_precision: str = "no") -> list[list[str]]:
    """Load the model folder (or GGUF) at ``model_path`` and :func:`sample` ``n`` responses per prompt
    (``mixed_precision``: as ``preftune train --mixed-precision``; ``auto`` = bf16 where it is fast)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(str(model_path), trust_remote_code)
    model = load_model(str(model_path), dtype, trust_remote_code=trust_remote_code).to(device).eval()
    return sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, batch_size=batch_size,
                  compute_dtype=resolve_compute_dtype(mixed_precision, device))
