"""The sampler: token-by-token decoding with a KV cache, behind every ``generate`` / ``eval`` / recipe sample.

* :func:`decode` — prompts (token ids) -> completions (token ids), in batches, one forward per new token:
  the lean forward of :mod:`preftune.model.fast_decode` for the Llama family (:func:`decode_batch_lean`),
  the model's Hugging Face forward for anything else (:func:`decode_batch`).
* :func:`decode_scored` — the same, and each completion's log-prob under the model from the logits it was
  sampled with (:func:`token_logps`): the KL estimates need no second forward of the sampled model.
* :func:`choose_tokens` — one decoding step's choice from the last logits: greedy, or temperature,
  top-k and top-p sampling driven by given uniform numbers (a pure function, tested on hand-set logits).
* :func:`sample_uniforms` — the uniform numbers of every sample: sample ``s`` draws from its own
  generator seeded by ``(seed, s)``.

What it does differently from Hugging Face ``generate`` (same arithmetic, same distribution):

* **No per-token machinery**: no logits-processor list, stopping-criteria objects or output
  dataclasses per step; one forward, one :func:`choose_tokens`, one append.
* **Finished rows leave the batch**: a row that emitted EOS is dropped from the input, the
  attention mask and the KV cache (``Cache.batch_select_indices``), so later steps compute only the
  rows still generating.
* **Prefill computes one row of logits** (``logits_to_keep=1``), not (B, P, V).
* **Reproducible per sample**: a sample's random draws come from its own seeded generator, so its
  tokens do not depend on which batch it landed in, the batch size, or the number of processes
  sampling a shard each (bit-equal draws; the model's arithmetic may still differ in the last bits
  between batch shapes in bf16).

Prompts arrive left padded: every row's last prompt token sits in the last column, positions are
counted from each row's first real token (``position_ids``), as ``generate`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch.nn import functional as nn_functional

from preftune.model.fast_decode import LeanDecoder, lean_decoder

COMPACT_SHARE = 0.25  # the lean path drops finished rows from its cache once they are this share of the batch
TOP_P_CANDIDATES = 256  # top-p first looks among this many most likely tokens; the full sort only if they fall short
PICK_BLOCK = 256  # columns per block of the two-level inverse-CDF draw


def sample_uniforms(n_samples: int, steps: int, seed: int, first: int = 0) -> torch.Tensor:
    """(n_samples, steps) float64 uniforms in [0, 1): row ``s`` from a generator seeded by ``(seed, first + s)``."""
    rows = []
    for s in range(first, first + n_samples):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + s)
        rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


def _pick(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: (B, V) unnormalized probabilities, (B,) uniforms -> (B,) column indices.

    Picks the first column whose running sum exceeds ``u * total``, in two levels so the running
    sums (float64) cover blocks of ``PICK_BLOCK`` columns and then one block, not the whole vocabulary
    per row (each block's own sum in float32: 256 terms; no float64 copy of the whole distribution, and
    no padded copy when the vocabulary is a multiple of the block). A column with zero probability is
    never picked (float rounding at a block's end falls back to the row's most likely column).
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // PICK_BLOCK)
    extra = blocks * PICK_BLOCK - vocab
    padded = (nn_functional.pad(probs, (0, extra)) if extra else probs.contiguous()).view(rows, blocks, PICK_BLOCK)
    block_mass = padded.sum(-1).double()  # (B, nb)
    block_cdf = block_mass.cumsum(-1)  # (B, nb)
    target = (uniforms.to(block_cdf.device, block_cdf.dtype) * block_cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=blocks - 1)  # (B, 1)
    before = block_cdf.gather(-1, block) - block_mass.gather(-1, block)  # (B, 1) mass left of the block
    inner = padded[torch.arange(rows, device=probs.device), block.squeeze(-1)].double()  # (B, PICK_BLOCK)
    offset = torch.searchsorted(before + inner.cumsum(-1), target, right=True).clamp_(max=PICK_BLOCK - 1)
    index = (block * PICK_BLOCK + offset).clamp_(max=vocab - 1).squeeze(-1)  # (B,)
    zero = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(zero.any()):
        index = torch.where(zero, probs.argmax(-1), index)
    return index


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """The next token of each row: (B, V) logits, (B,) uniforms in [0, 1) -> (B,) token ids.

    ``temperature == 0`` is greedy (argmax; the uniforms are unused). Otherwise, in the order
    Hugging Face applies them: logits / temperature; ``top_k > 0`` keeps the k largest logits (ties
    with the k-th kept); ``top_p < 1`` keeps the most likely tokens until their probability reaches
    ``top_p`` (a token is kept when the probability of the tokens more likely than it is < top_p;
    at least one); then one inverse-CDF draw with the row's uniform over the kept tokens' renormalized
    probabilities. Computed in float32 (the draw's running sum in float64).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p >= 1:
        return _pick(probs, uniforms)
    count = min(vocab, TOP_P_CANDIDATES)
    head, index = probs.topk(count, dim=-1)  # (B, C) descending, with their columns
    if count < vocab and bool((head.sum(-1) < top_p).any()):  # the cut-off lies past the candidates
        head, index = probs.sort(dim=-1, descending=True)
    kept = head * ((head.cumsum(-1) - head) < top_p)  # exclusive running sum < top_p
    return index.gather(-1, _pick(kept, uniforms).unsqueeze(-1)).squeeze(-1)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, V) logits, (B,) chosen token ids -> (B,) float32 log-probs of the tokens under the logits as
    they are (no temperature, top-k or top-p: the model's own distribution); log-softmax in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.view(-1, 1)).squeeze(-1)


def _add_scores(scores: list[float], rows: torch.Tensor, logps: torch.Tensor) -> None:
    """Add each (b,) log-prob to its batch row's running sum (a Python float: double precision)."""
    for row, value in zip(rows.tolist(), logps.tolist()):
        scores[row] += value


def _forward_names(model) -> tuple[str, bool]:
    """The model forward's cache keyword (``cache`` in newer transformers, ``past_key_values`` before)
    and whether it takes ``logits_to_keep``; read once from the forward's signature."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes through
    params = inspect.signature(type(base).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _left_pad(chunk: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(input_ids, attention_mask)``, both (B, P) long, left padded to the longest."""
    width = max(len(ids) for ids in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, ids in enumerate(chunk):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def decode_batch(model, chunk: Sequence[Sequence[int]], uniforms: torch.Tensor, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, scores: list[float] | None = None) -> list[list[int]]:
    """One batch of prompts -> their completions' token ids (each ends at its first EOS, kept, or after
    ``max_new_tokens``). ``uniforms``: (B, max_new_tokens), row b's draws for prompt b. ``scores`` (a list
    of B zeros, or None): each completion's summed log-prob under the model is added to its entry
    (:func:`token_logps`)."""
    cache_name, keeps_logits = _forward_names(model)
    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in _left_pad(chunk, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # (B, P): counted from each row's first real token
    extra = {"logits_to_keep": 1} if keeps_logits else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache = getattr(out, "cache", None) or out.past_key_values
    live = torch.arange(len(chunk))  # (b,) which prompt each remaining row is
    next_position = positions[:, -1:] + 1  # (b, 1)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    completions: list[list[int]] = [[] for _ in chunk]
    for step in range(max_new_tokens):
        last = out.logits[:, -1, :]  # (b, V)
        tokens = choose_tokens(last, uniforms[live, step], temperature, top_k, top_p).cpu()  # (b,)
        for row, token in zip(live.tolist(), tokens.tolist()):
            completions[row].append(token)
        if scores is not None:
            _add_scores(scores, live, token_logps(last, tokens.to(last.device)))
        going = ~torch.isin(tokens, eos)  # (b,)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the batch and the cache
            keep = going.nonzero().squeeze(-1)  # (b',) on the CPU
            on_device = keep.to(device)
            cache.batch_select_indices(on_device)
            live, tokens = live[keep], tokens[keep]
            mask, next_position = mask[on_device], next_position[on_device]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)  # (b, P + step + 1)
        out = model(input_ids=tokens.unsqueeze(-1).to(device), attention_mask=mask, position_ids=next_position,
                    use_cache=True, **{cache_name: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        next_position = next_position + 1
    return completions


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` (None when autocast is off there)."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def decode_batch_lean(lean: LeanDecoder, chunk: Sequence[Sequence[int]], uniforms: torch.Tensor,
                      max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, scores: list[float] | None = None) -> list[list[int]]:
    """:func:`decode_batch` on a :class:`preftune.model.fast_decode.LeanDecoder` (same inputs, same completions).

    A finished row stays in the batch (its tokens ignored, no draw made for it) until the finished rows are
    ``COMPACT_SHARE`` of the batch; then they leave the cache together (one copy of the filled cache instead
    of one per finishing step)."""
    input_ids, mask = (t.to(lean.device) for t in _left_pad(chunk, pad_id))
    logits = lean.prefill(input_ids, mask, max_new_tokens)  # (B, V)
    rows = torch.arange(len(chunk))  # (b,) which prompt each batch row is
    done = torch.zeros(len(chunk), dtype=torch.bool)  # (b,)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    completions: list[list[int]] = [[] for _ in chunk]
    for step in range(max_new_tokens):
        going = (~done).nonzero().squeeze(-1)  # (g,) batch rows still generating
        live = logits if going.numel() == len(rows) else logits[going.to(lean.device)]  # (g, V)
        chosen = choose_tokens(live, uniforms[rows[going], step], temperature, top_k, top_p).cpu()  # (g,)
        for row, token in zip(rows[going].tolist(), chosen.tolist()):
            completions[row].append(token)
        if scores is not None:
            _add_scores(scores, rows[going], token_logps(live, chosen.to(live.device)))
        tokens = torch.full((len(rows),), int(eos[0]), dtype=torch.long)
        tokens[going] = chosen
        done[going] = torch.isin(chosen, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if int(done.sum()) >= max(1.0, COMPACT_SHARE * len(rows)):
            keep = (~done).nonzero().squeeze(-1)  # (b',)
            lean.keep_rows(keep.to(lean.device))
            rows, tokens, done = rows[keep], tokens[keep], done[keep]
        logits = lean.step(tokens.to(lean.device))
    return completions


def decode(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           first_sample: int = 0) -> list[list[int]]:
    """Completions (token ids) of ``prompt_ids[s]`` for every s, in the given order.

    Batches of ``batch_size`` in order of prompt length (longest first, so an out-of-memory error
    shows at the first batch; a batch is padded to its longest prompt). Sample ``s`` draws from
    :func:`sample_uniforms` row ``first_sample + s`` (a shard of a larger sampling job passes its
    offset and gets the samples the whole job would). The caller sets eval mode, ``no_grad`` and
    autocast. A Llama-family model runs on the lean forward of :mod:`preftune.model.fast_decode` (in
    autocast's dtype when autocast is on); any other model on its Hugging Face forward.
    """
    return decode_scored(model, prompt_ids, max_new_tokens, eos_ids, pad_id, temperature, top_k, top_p, seed,
                         batch_size, first_sample, score=False)[0]


def decode_scored(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                  pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  batch_size: int = 8, first_sample: int = 0,
                  score: bool = True) -> tuple[list[list[int]], list[float] | None]:
    """:func:`decode`, and with ``score`` each completion's summed log-prob under the model: the
    log-softmax (float32) of the very logits its tokens were drawn from, before temperature, top-k and
    top-p (:func:`token_logps`) — the model's own log-prob of the completion, from the forward that
    sampled it, so no second forward is needed to score it (None without ``score``)."""
    uniforms = sample_uniforms(len(prompt_ids), max_new_tokens, seed, first_sample)  # (S, T)
    longest = max((len(ids) for ids in prompt_ids), default=0)
    lean = lean_decoder(model, _compute_dtype(next(model.parameters()).device), batch_size,
                        longest + max_new_tokens) if prompt_ids else None
    order = sorted(range(len(prompt_ids)), key=lambda s: -len(prompt_ids[s]))
    completions: list[list[int]] = [[] for _ in prompt_ids]
    scores: list[float] | None = [0.0] * len(prompt_ids) if score else None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [prompt_ids[s] for s in rows]
        chunk_scores = [0.0] * len(rows) if score else None
        run = decode_batch_lean if lean is not None else decode_batch
        done = run(lean if lean is not None else model, chunk, uniforms[rows], max_new_tokens, eos_ids, pad_id,
                   temperature, top_k, top_p, chunk_scores)
        for b, (s, ids) in enumerate(zip(rows, done)):
            completions[s] = ids
            if scores is not None:
                scores[s] = chunk_scores[b]
    if lean is not None:
        lean.release()
    return completions, scores


def decode_on_ranks(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                    pad_id: int, state, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 8, score: bool = False) -> tuple[list[list[int]], list[float] | None]:
    """:func:`decode_scored` shared by the processes of a distributed run (``state``: accelerate's
    ``PartialState`` or ``Accelerator``): process r decodes the r-th contiguous share of the samples,
    with the sample indices the whole job gives them, and every process gets every completion (and its
    score, with ``score``) back (``gather_object``) — the same completions one process would draw."""
    from accelerate.utils import gather_object

    world, rank = state.num_processes, state.process_index
    share = -(-len(prompt_ids) // world) if prompt_ids else 0
    start = min(rank * share, len(prompt_ids))
    mine = decode_scored(model, prompt_ids[start:start + share], max_new_tokens, eos_ids, pad_id, temperature,
                         top_k, top_p, seed, batch_size, first_sample=start, score=score)
    if world == 1:
        return mine
    parts = gather_object([mine])
    completions = [ids for part, _ in parts for ids in part]
    return completions, ([x for _, part in parts for x in part] if score else None)

