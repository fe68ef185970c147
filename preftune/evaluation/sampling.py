"""Sampling from a model, and the KL to a base measured on those samples.

* :func:`sample` — seeded, batched, left-padded generation -> completion texts.
* :func:`sample_token_ids` — the same as token ids, one entry per sample.
* :func:`sample_from_path` — load a model folder (or GGUF) and :func:`sample`.
* :func:`estimate_kl` — Monte-Carlo KL(model || base) on the model's own samples, scored by
  :func:`preftune.evaluation.scoring.completion_logps`.

Prompts are plain text, or chat message lists (``[{"role": ..., "content": ...}]``) rendered with
the tokenizer's chat template and ``add_generation_prompt=True``: a prompt is sampled on exactly the
ids it is trained and scored on (:func:`preftune.data.tokenize.prompt_token_ids`). The model is put
in eval mode for each call and given back in the mode it came in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preftune.data.tokenize import prompt_token_ids, special_prefix_ids
from preftune.evaluation.judges.base import Prompt
from preftune.evaluation.metrics import kl_from_samples
from preftune.evaluation.scoring import completion_logps, eval_mode, model_device, pad_token_id
from preftune.model.loading import load_model, load_tokenizer
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
    device = model_device(model)
    pad_id, eos_ids = pad_token_id(tokenizer), _eos_ids(model, tokenizer)
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
    # benchmarks/bench_generation.py). Longest first, as scoring orders its batches, so an out-of-memory
    # error shows at the first batch. Stable sort: results still depend only on (seed, prompts, n,
    # batch_size); they come back in the prompts' order.
    order = sorted(range(len(prompt_ids)), key=lambda s: -len(prompt_ids[s]))
    completion_ids: list[list[int]] = [[] for _ in prompt_ids]
    cuda_devices = [device] if device.type == "cuda" else []
    with (torch.random.fork_rng(devices=cuda_devices), eval_mode(model), torch.no_grad(),
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
    pad_id = pad_token_id(tokenizer)
    policy_logps = completion_logps(model, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype)  # (S,)
    base_logps = completion_logps(base, prompt_ids, completion_ids, pad_id, batch_size, compute_dtype)  # (S,)
    return kl_from_samples(policy_logps, base_logps)


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
