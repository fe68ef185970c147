"""Sampling from a model, scoring completions, KL to a base model, on-policy pairs.

* :func:`sample` — seeded, batched, left-padded generation -> completion texts.
* :func:`sequence_logps` — summed log-prob of each completion given its prompt.
* :func:`completion_logps` — the same for token ids (e.g. sampled ones).
* :func:`estimate_kl` — Monte-Carlo KL(model || base) on the model's own samples.
* :func:`best_vs_worst_pairs` — best and worst of n samples per prompt, by a judge.
* :func:`candidate_records` / :func:`onpolicy_candidates` — every sample per prompt kept, as a
  candidates file for people to label (``preftune generate --keep-all``, ``preftune label serve``).

Prompts are plain text, or chat message lists (``[{"role": ..., "content": ...}]``)
rendered with the tokenizer's chat template and ``add_generation_prompt=True``.

One data path (STYLE.md): prompts and completions are tokenized by the training data path
(:mod:`preftune.data.tokenize`: boundary-exact, one BOS, the chat template), and every score
comes from the training loop's batches (:mod:`preftune.data.collate`, packed when the model
can run packed batches) and :func:`preftune.model.logprobs.batch_logps` (output head applied only
where a completion token is predicted, in chunks; never the (B, L, V) logits). A prompt is
sampled on exactly the ids it is trained and scored on.
The model is put in eval mode for each call and given back in the mode it came in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from preftune.data.records import Example, TokenizedExample
from preftune.data.tokenize import prompt_token_ids, render_prompt, special_prefix_ids, tokenize_example
from preftune.evaluation.judges.base import Judge, Prompt, ScoringJudge, check_lengths
from preftune.evaluation.metrics import kl_from_samples
from preftune.model.logprobs import batch_logps
from preftune.model.packing import scoring_collate
from preftune.model.precision import autocast, resolve_compute_dtype

# ----------------------------------------------------------------------------- tokens


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS(s)."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; generation could not stop")
    return sorted(ids)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- sampling


def sample(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           compute_dtype: torch.dtype | None = None) -> list[list[str]]:
    """``n`` sampled completions per prompt, decoded with the prompt removed and special tokens skipped.

    Returns ``texts[i][j]``: the j-th completion of prompt i. Generation stops at EOS (the
    tokenizer's and the model's generation-config EOS ids) or after ``max_new_tokens``.
    ``temperature=0`` is greedy decoding. Sampling uses exactly ``temperature`` and
    ``top_p``: the model's own generation config (top-k, repetition penalty, ...) is
    overridden. Results are reproducible for the same (seed, prompts, n, batch_size) on the
    same device; the global RNG state is restored afterwards. ``compute_dtype`` (e.g.
    ``torch.bfloat16``) runs the forwards under ``torch.autocast`` to it (None: the weights' dtype).
    """
    _, completion_ids = sample_token_ids(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                         compute_dtype=compute_dtype)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def sample_token_ids(model, tokenizer, prompts: Sequence[Prompt], n: int = 1, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                     compute_dtype: torch.dtype | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Like :func:`sample` but token ids: ``(prompt_ids, completion_ids)``, one entry per sample.

    Sample ``s = i * n + j`` is the j-th completion of prompt i. The prompt ids are
    :func:`prompt_token_ids` (the training path's). A completion keeps its final EOS when it
    has one (its probability is part of the sequence's), and nothing after.
    """
    from transformers import GenerationConfig

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1, got {n}, {batch_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    device = _device(model)
    pad_id, eos_ids = _pad_id(tokenizer), _eos_ids(model, tokenizer)
    # Every knob set explicitly: values left None would be filled from the model's config.
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: off
    else:  # greedy; transformers' neutral values, so a model config's sampling knobs raise no warnings
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, num_beams=1,
                              **sampling)
    prefix = special_prefix_ids(tokenizer)
    prompt_ids = [ids for ids in (prompt_token_ids(tokenizer, p, prefix) for p in prompts) for _ in range(n)]
    # Batches of similar prompt length: a batch is left padded to its longest prompt, and real prompts
    # vary 10x in length (HH-RLHF: 30 to 500+ tokens), so batching in file order spends most of the
    # prefill and every decode step's attention on padding (measured on SmolLM2-135M, 240 HH prompts:
    # benchmarks/bench_generation.py). Longest first, as :func:`_score` does, so an out-of-memory error
    # shows at the first batch. Stable sort: results still depend only on (seed, prompts, n, batch_size);
    # they come back in the prompts' order.
    order = sorted(range(len(prompt_ids)), key=lambda s: -len(prompt_ids[s]))
    completion_ids: list[list[int]] = [[] for _ in prompt_ids]
    cuda_devices = [device] if device.type == "cuda" else []
    with (torch.random.fork_rng(devices=cuda_devices), _eval_mode(model), torch.no_grad(),
          autocast(device.type, compute_dtype)):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk = [prompt_ids[s] for s in rows]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, P) left padded
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)  # (B, P + T)
            for s, row in zip(rows, output[:, width:].tolist()):
                # Rows that stopped early are padded after their EOS: keep up to and including it.
                end = next((t + 1 for t, token in enumerate(row) if token in eos_ids), len(row))
                completion_ids[s] = row[:end]
    return prompt_ids, completion_ids


# ----------------------------------------------------------------------------- scoring


def sequence_logps(model, tokenizer, prompts: Sequence[Prompt], completions: Sequence[str],
                   batch_size: int = 8, append_eos: bool = False,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S,) summed log-prob of each completion given its prompt under ``model`` (float32, CPU).

    Tokenized as the training data path tokenizes an SFT example
    (:func:`preftune.data.tokenize.tokenize_example`): boundary-exact (a BPE token merged across
    the prompt/completion boundary belongs to the completion), one BOS, chat prompts through the
    template; scored as :func:`completion_logps` scores.

    ``append_eos=True`` scores the completion as a *finished* response ("says this, then
    stops"), exactly the ids training scores: a plain-text completion with the tokenizer's EOS
    appended, a reply to a chat prompt as the assistant turn with the template's end of turn
    (e.g. ``<|im_end|>\n``; no EOS, as in training). ``append_eos=False`` (the default) scores
    the completion text's own tokens only: no EOS, and a chat reply as the text right after the
    rendered prompt, without the end of turn. An empty completion then scores 0.
    """
    check_lengths(prompts=prompts, completions=completions)
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True but the tokenizer has no EOS token")
    prefix = special_prefix_ids(tokenizer)
    examples = [scoring_example(tokenizer, prompt, completion, append_eos, index, prefix)
                for index, (prompt, completion) in enumerate(zip(prompts, completions))]
    return _score(model, examples, _pad_id(tokenizer), batch_size, compute_dtype)


def scoring_example(tokenizer, prompt: Prompt, completion: str, finished: bool, index: int,
                    prefix: list[int], max_length: int | None = None) -> TokenizedExample | None:
    """One (prompt, completion) through the training path's tokenizer; see :func:`sequence_logps`
    (``finished`` is its ``append_eos``). ``max_length`` cuts as training does; None when the cut
    leaves no completion token."""
    if finished and not isinstance(prompt, str):  # a finished chat reply: the template ends the turn
        reply = [{"role": "assistant", "content": completion}]
        return tokenize_example(tokenizer, Example(kind="sft", prompt=list(prompt), completion=reply), index,
                                max_length, prefix_ids=prefix)
    text = render_prompt(tokenizer, prompt)
    if not completion:  # the training path refuses an empty completion; scored alone it is just the end
        ending = [tokenizer.eos_token_id] if finished else []
        return TokenizedExample(index=index, prompt_ids=prompt_token_ids(tokenizer, text, prefix),
                                completions=[ending])
    example = tokenize_example(tokenizer, Example(kind="sft", prompt=text, completion=completion), index,
                               max_length, prefix_ids=prefix)
    if example is None:
        return None
    ids = example.completions[0]
    if not finished and ids[-1] == tokenizer.eos_token_id and not completion.endswith(tokenizer.eos_token):
        example.completions = [ids[:-1]]  # the EOS the plain-text path appended (not one the text ends with)
    return example


def completion_logps(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                     pad_id: int, batch_size: int = 8, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S,) float32 CPU summed log-probs of token-id completions after token-id prompts, in input order.

    Sequence s is an SFT-kind :class:`~preftune.data.records.TokenizedExample` (one prompt, K = 1
    completion), batched ``batch_size`` sequences at a time by the training loop's collate
    function and scored by :func:`preftune.model.logprobs.batch_logps`; no grad, eval mode. An empty
    completion scores 0. ``compute_dtype`` (e.g. ``torch.bfloat16``): ``batch_logps``'s mixed
    precision (autocast body, head matmuls in it, log-softmax fp32); None: the weights' dtype.
    """
    check_lengths(prompt_ids=prompt_ids, completion_ids=completion_ids)
    examples = [TokenizedExample(index=s, prompt_ids=list(prompt), completions=[list(completion)])
                for s, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids))]
    return _score(model, examples, pad_id, batch_size, compute_dtype)


def _score(model, examples: list[TokenizedExample], pad_id: int, batch_size: int,
           compute_dtype: torch.dtype | None) -> torch.Tensor:
    """(S,) float32 CPU ``batch_logps`` of one-completion examples; ``examples[s].index == s``.

    Longest first (as the loop orders a length-grouped epoch), so an out-of-memory error shows at
    the first batch; empty completions are not collated (they would have no target token) and
    score 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not example.prompt_ids for example in examples):
        raise ValueError("every prompt needs at least one token")
    logps = torch.zeros(len(examples), dtype=torch.float32)  # (S,)
    scored = sorted((ex for ex in examples if ex.completions[0]), key=lambda ex: -ex.num_tokens)
    if not scored:
        return logps
    collate, device = scoring_collate(model, pad_id), _device(model)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(scored), batch_size):
            batch = collate(scored[start:start + batch_size])
            out = batch_logps(model, batch.to(device), compute_dtype=compute_dtype)  # (G,) with K = 1
            logps[batch.example_index] = out.logps.float().cpu()
    return logps


def estimate_kl(model, base, tokenizer, prompts: Sequence[Prompt], n_samples: int = 4, max_new_tokens: int = 64,
                seed: int = 0, batch_size: int = 8, compute_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Monte-Carlo KL(model || base) per sequence, in nats: ``(mean, stderr)``.

    Draws ``n_samples`` completions per prompt from ``model`` at temperature 1 and top-p 1
    (any other setting would not sample the model's own distribution), scores the sampled
    token ids (not re-tokenized text) under both models with :func:`completion_logps`, and
    averages log p - log q with :func:`preftune.evaluation.metrics.kl_from_samples`. Completions cut at
    ``max_new_tokens`` estimate the KL of the distribution over such truncated sequences.
    ``model is base`` gives 0. ``compute_dtype`` is used for sampling and scoring alike.
    """
    prompt_ids, completion_ids = sample_token_ids(model, tokenizer, prompts, n=n_samples,
                                                  max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                                                  compute_dtype=compute_dtype)
    pad_id = _pad_id(tokenizer)
    policy_logps = completion_logps(model, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype)  # (S,)
    base_logps = completion_logps(base, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype)  # (S,)
    return kl_from_samples(policy_logps, base_logps)


# ----------------------------------------------------------------------------- on-policy pairs


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
        flat_prompts = [p for p, samples in zip(prompts, samples_per_prompt) for _ in samples]
        flat_samples = [s for samples in samples_per_prompt for s in samples]
        flat_scores = judge.score(flat_prompts, flat_samples)
        points, offset = [], 0
        for samples in samples_per_prompt:
            points.append(flat_scores[offset:offset + len(samples)])
            offset += len(samples)
    else:
        games = [(p_index, i, j) for p_index, samples in enumerate(samples_per_prompt)
                 for i in range(len(samples)) for j in range(i + 1, len(samples))]
        result = judge.compare([prompts[p] for p, _, _ in games],
                               [samples_per_prompt[p][i] for p, i, _ in games],
                               [samples_per_prompt[p][j] for p, _, j in games])
        points = [[0.0] * len(samples) for samples in samples_per_prompt]
        for (p, i, j), outcome in zip(games, result.outcomes):
            points[p][i] += outcome
            points[p][j] += 1.0 - outcome
    pairs, skipped_ties = [], 0
    for prompt, samples, values in zip(prompts, samples_per_prompt, points):
        best = max(range(len(values)), key=values.__getitem__)
        worst = min(range(len(values)), key=values.__getitem__)
        if values[best] == values[worst] or samples[best] == samples[worst]:
            skipped_ties += 1
            continue
        pairs.append({"prompt": prompt, "chosen": samples[best], "rejected": samples[worst]})
    return pairs, skipped_ties


# ----------------------------------------------------------------------------- candidates (--keep-all)


def candidate_records(prompts: Sequence[Prompt], samples_per_prompt: Sequence[Sequence[str]],
                      judge: Judge | None = None, meta: dict | None = None) -> list[dict]:
    """Every sample of every prompt: ``{"prompt", "responses": [...], "meta": {...}}`` per prompt.

    ``meta`` (e.g. the model and sampling settings) is copied into each record with ``n``. A
    scoring judge adds ``meta["scores"]`` (one per response, in order); a pairwise judge adds
    nothing (its verdicts are what the people labelling replace). Empty samples are kept: every
    sample is written, and the labelling app lets people mark both responses bad.
    """
    check_lengths(prompts=prompts, samples_per_prompt=samples_per_prompt)
    scores: list[list[float]] | None = None
    if isinstance(judge, ScoringJudge):
        flat = judge.score([p for p, samples in zip(prompts, samples_per_prompt) for _ in samples],
                           [s for samples in samples_per_prompt for s in samples])
        scores, offset = [], 0
        for samples in samples_per_prompt:
            scores.append([float(x) for x in flat[offset:offset + len(samples)]])
            offset += len(samples)
    records = []
    for i, (prompt, samples) in enumerate(zip(prompts, samples_per_prompt)):
        record_meta = {**(meta or {}), "n": len(samples)}
        if scores is not None:
            record_meta["scores"] = scores[i]
        records.append({"prompt": prompt, "responses": list(samples), "meta": record_meta})
    return records


def sample_from_path(model_path, prompts: Sequence[Prompt], n: int, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                     dtype: str = "float32", trust_remote_code: bool = False,
                     device: str | None = None, mixed_precision: str = "no") -> list[list[str]]:
    """Load the model folder (or GGUF) at ``model_path`` and :func:`sample` ``n`` responses per prompt
    (``mixed_precision``: as ``preftune train --mixed-precision``; ``auto`` = bf16 where it is fast)."""
    from preftune.model.loading import load_model, load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(str(model_path), trust_remote_code)
    model = load_model(str(model_path), dtype, trust_remote_code=trust_remote_code).to(device).eval()
    return sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, batch_size=batch_size,
                  compute_dtype=resolve_compute_dtype(mixed_precision, device))


def onpolicy_candidates(model_path, prompts: Sequence[Prompt], n: int = 4, judge: str | Judge | None = None,
                        max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                        batch_size: int = 8, dtype: str = "float32", trust_remote_code: bool = False,
                        device: str | None = None, mixed_precision: str = "no") -> list[dict]:
    """Load ``model_path``, sample ``n`` responses per prompt, and return :func:`candidate_records`
    (the meta records the model and the sampling settings)."""
    from preftune.evaluation.judges.base import make_judge

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    judge = make_judge(judge) if isinstance(judge, str) else judge
    samples = sample_from_path(model_path, prompts, n, max_new_tokens, temperature, top_p, seed, batch_size, dtype,
                               trust_remote_code, device, mixed_precision)
    meta = {"model": str(model_path), "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
            "seed": seed}
    return candidate_records(prompts, samples, judge, meta)
