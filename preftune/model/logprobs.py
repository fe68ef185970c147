"""Model forward -> per-sequence log-probs of the completion tokens of a :class:`Batch`.

The model *body* runs on the whole batch; the output head (vocabulary V) is applied only
to the N hidden states that predict a target token, in chunks, through
:class:`ChunkedHeadLogp`, which holds one chunk's ``(chunk, V)`` fp32 logits at a time
(plus, for a trained head and within a byte budget, the (N, V) softmax for backward;
beyond the budget backward recomputes it). Log-softmax is in fp32 even for bf16 models.

Works on a ``transformers`` causal LM, also wrapped by ``peft`` (LoRA etc. injected into
the layers). Under DDP/FSDP hand :class:`LogProbModel` (not the bare model) to the wrapper:
the wrapper's ``forward`` must run for gradients to be synchronised, and ``batch_logps``
calls the body and head directly.

Packed batches take their attention mask from :mod:`preftune.model.masks` (converted for the
attention implementation, sliding windows folded in); whether a model may run them was decided
once, when the batch builder was made (:mod:`preftune.model.packing`). The model's parts (the
causal LM inside a wrapper, its body, its text config) come from :mod:`preftune.model.anatomy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from preftune.data.batch import Batch
from preftune.model.anatomy import CausalLMWrapper, body, causal_lm, no_split_modules, text_config
from preftune.model.masks import packed_attention_mask
from preftune.model.precision import autocast

# Softmax kept from forward to backward for a trained head, at most (beyond: recomputed).
DEFAULT_CACHE_BYTES = 512 * 2**20

# Config fields that change logits after the head (Gemma 2 softcapping, Cohere / Granite /
# Falcon-H1 scaling). With any of them active we use the model's own full-logits forward.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                     "lm_head_multiplier": 1.0}


@dataclass
class LogpOutput:
    logps: torch.Tensor  # (S,) fp32: summed log-prob of each sequence's target tokens
    counts: torch.Tensor  # (S,) long: number of target tokens of each sequence
    token_logps: torch.Tensor  # (N,) fp32: per target token, in the batch's token order
    token_log_sum_sq: torch.Tensor | None = None  # (N,) fp32 log sum_v p(v)^2 per token (WPO), no grad
    rewards: torch.Tensor | None = None  # (S,) fp32 scalar head output of a reward model (then logps are 0)

    @property
    def mean_logps(self) -> torch.Tensor:
        """(S,) average log-prob per target token (SimPO, IPO length normalisation)."""
        return self.logps / self.counts


@dataclass
class GroupLogps:
    """Per-response log-probs of a batch of response groups (G groups of at most K responses each),
    all (G, K): ``[g, k]`` is response k of group g, sequence ``s = k * G + g`` of the batch.
    Where ``mask`` is False (a group of fewer than K responses) every value is 0."""

    logps: torch.Tensor  # (G, K) fp32: summed log-prob of each response's tokens
    mean_logps: torch.Tensor  # (G, K) fp32: the same averaged per token (SimPO / IPO length normalisation)
    counts: torch.Tensor  # (G, K) long: target tokens of each response
    mask: torch.Tensor  # (G, K) bool: which responses exist


def per_group(values: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(S,) per-sequence values, ``s = k * G + g`` -> (G, K) with ``[g, k]`` (gradients flow through)."""
    if values.shape[0] % num_groups:
        raise ValueError(f"{values.shape[0]} sequence values do not split into {num_groups} groups")
    return values.view(-1, num_groups).t()


def group_logps(logps: torch.Tensor, batch: Batch) -> GroupLogps:
    """(S,) summed log-probs of ``batch``'s sequences (a policy's ``LogpOutput.logps`` or a reference's)
    -> :class:`GroupLogps`, each (G, K); the mask is ``batch.completion_mask`` (all True for batches
    that are not response groups), the counts the batch's target tokens per sequence."""
    g_count, k_count = batch.num_groups, batch.num_completions
    counts = per_group(torch.bincount(batch.token_seq, minlength=g_count * k_count), g_count)  # (G, K)
    mask = batch.completion_mask
    if mask is None:
        mask = torch.ones((g_count, k_count), dtype=torch.bool, device=counts.device)
    mask = mask.to(counts.device)
    summed = per_group(logps.float(), g_count)
    zero = summed.new_zeros(())
    return GroupLogps(logps=torch.where(mask, summed, zero),
                      mean_logps=torch.where(mask, summed / counts.clamp(min=1), zero),
                      counts=counts, mask=mask)


# ----------------------------------------------------------------------------- chunked head


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, H) -> (n, V) fp32 logits."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.float()


class ChunkedHeadLogp(torch.autograd.Function):
    """log_softmax(hidden @ W.T + b)[i, targets[i]] for (N, H) hidden, chunk by chunk.

    With ``p`` the softmax and ``e_t`` the one-hot target, ``dlogp/dlogits = -(p - e_t)``
    =: ``-d``, so ``dlogp/dhidden = -d @ W`` and ``dL/dW = -d.T @ (g * h)``. Forward
    computes ``d @ W`` (N, H) when ``hidden`` needs a gradient, so backward only scales it.
    If W or b need a gradient, forward also keeps ``d`` (N, V) when it fits in
    ``cache_bytes``; otherwise backward recomputes it chunk by chunk from the saved
    log-sum-exp. Head matmuls (of N*V*H each): frozen head 2, trained head 3 (``d`` kept)
    or 4 (recomputed); plain autograd needs 3 and holds (N, V) logits and their grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, cache_bytes, compute_dtype=None):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_hidden = ctx.needs_input_grad[0]
        need_head = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        mm_dtype = compute_dtype or weight.dtype  # matmul dtype; logits, softmax and log-probs are fp32
        keep = need_head and n * vocab * mm_dtype.itemsize <= cache_bytes
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        unit = torch.empty_like(hidden) if need_hidden else None
        kept = []
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # casts are explicit here
            head_w, head_b = _cast(weight, mm_dtype), _cast(bias, mm_dtype)  # (V, H), (V,): one cast per call
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                target = targets[start:end, None]
                logits = _head_logits(hidden[start:end].to(mm_dtype), head_w, head_b)  # (n_c, V) fp32
                target_logits = logits.gather(1, target).squeeze(1)
                top, total = _exp_shifted_(logits)  # logits now hold exp(logits - top)
                lse[start:end] = top + total.log()
                logps[start:end] = target_logits - lse[start:end]
                if need_hidden or keep:
                    probs = logits.div_(total[:, None])
                    d = _minus_onehot(probs, target).to(mm_dtype)  # (n_c, V) p - e_t
                    if need_hidden:
                        unit[start:end] = d @ head_w
                    if keep:
                        kept.append(d)
        ctx.chunk_size, ctx.mm_dtype = chunk_size, mm_dtype
        ctx.save_for_backward(hidden, weight, bias, targets, lse, unit, *kept)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # (N,) fp32
        hidden, weight, bias, targets, lse, unit, *kept = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        mm_dtype = ctx.mm_dtype
        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = (unit.float() * -grad_logps[:, None]).to(hidden.dtype)
        if need_weight or need_bias:
            head_w, head_b = _cast(weight, mm_dtype), _cast(bias, mm_dtype)
            scaled = (hidden.float() * grad_logps[:, None]).to(mm_dtype)  # (N, H) g * h
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
            for c, start in enumerate(range(0, hidden.shape[0], ctx.chunk_size)):
                end = min(start + ctx.chunk_size, hidden.shape[0])
                if kept:
                    d = kept[c]
                else:
                    logits = _head_logits(hidden[start:end].to(mm_dtype), head_w, head_b)
                    d = _minus_onehot(logits.sub_(lse[start:end, None]).exp_(), targets[start:end, None])
                    d = d.to(mm_dtype)
                if need_weight:
                    if mm_dtype == torch.float32:
                        grad_weight.addmm_(d.t(), scaled[start:end], alpha=-1.0)
                    else:  # 16-bit matmul, fp32 accumulation across chunks
                        grad_weight -= (d.t() @ scaled[start:end]).float()
                if need_bias:
                    grad_bias -= (grad_logps[start:end].to(d.dtype) @ d).float()
            grad_weight = grad_weight.to(weight.dtype) if need_weight else None
            grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: (n, V) logits -> exp(logits - top); returns (n,) ``top`` (row max) and ``total`` (row sum).

    log-sum-exp = top + log(total), softmax = the result / total: the same arithmetic as
    ``log_softmax``, but written over the logits instead of into a second (n, V) buffer, so
    a chunk costs one (chunk, V) buffer at its peak, not two (and one fewer allocation).
    """
    top = logits.amax(dim=1)
    total = logits.sub_(top[:, None]).exp_().sum(dim=1)
    return top, total


def _minus_onehot(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: (n, V) probs - one-hot of (n, 1) target."""
    return probs.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=probs.dtype, device=probs.device))


def chunked_target_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_size: int = 1024,
                         cache_bytes: int = DEFAULT_CACHE_BYTES,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, H) hidden states, (V, H) head weight, (V,) bias or None, (N,) targets -> (N,) fp32 log-probs.

    ``chunk_size`` bounds the (chunk, V) logits held at once; ``cache_bytes`` bounds the
    softmax kept from forward to backward for a trained head (0: always recompute).
    ``compute_dtype`` (e.g. bf16 under mixed precision) is the dtype of the head matmuls;
    logits are upcast to fp32 before the log-softmax either way.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return ChunkedHeadLogp.apply(hidden, weight, bias, targets, chunk_size, cache_bytes, compute_dtype)
    mm_dtype = compute_dtype or weight.dtype
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        head_w, head_b = _cast(weight, mm_dtype), _cast(bias, mm_dtype)
        for start in range(0, hidden.shape[0], chunk_size):  # reference forward: nothing kept
            logits = _head_logits(hidden[start:start + chunk_size].to(mm_dtype), head_w, head_b)
            target_logits = logits.gather(1, targets[start:start + chunk_size, None]).squeeze(1)
            top, total = _exp_shifted_(logits)
            out[start:start + chunk_size] = target_logits - top - total.log()
    return out


def _module_chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n_c, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _module_head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """Any head module (LoRA on lm_head, quantized Linear): chunks under activation checkpointing."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (head, hidden[start:start + chunk_size], targets[start:start + chunk_size])
        if torch.is_grad_enabled():
            out.append(checkpoint(_module_chunk_logps, *args, use_reentrant=False))
        else:
            out.append(_module_chunk_logps(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------- log-probs


def _needs_full_logits(lm: nn.Module) -> bool:
    config = text_config(lm)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return True
    return lm.get_output_embeddings() is None



@torch.no_grad()
def head_log_sum_sq(head: nn.Module, hidden: torch.Tensor, chunk_size: int,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, H) hidden -> (N,) fp32 ``log sum_v p(v)^2`` of the head's distribution at each token.

    WPO's normaliser (Zhou et al. 2024: the probability of a token under the policy's own
    sampling, ``log p(y_t) - log sum_v p(v)^2``). No gradient flows through it, so it is a
    separate no-grad pass over the head, ``chunk_size`` rows at a time: one more head matmul per
    policy forward, only when ``--use-weighting`` is on.
    """
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        with autocast(hidden.device.type, compute_dtype):
            logits = head(hidden[start:start + chunk_size].detach())  # (n_c, V)
        out.append(torch.logsumexp(2 * logits.float().log_softmax(-1), dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def batch_logps(model: nn.Module, batch: Batch, chunk_size: int = 1024,
                cache_bytes: int = DEFAULT_CACHE_BYTES, compute_dtype: torch.dtype | None = None,
                with_log_sum_sq: bool = False) -> LogpOutput:
    """Summed log-probs of every sequence's target tokens: (S,) with S = K * G.

    ``model`` is a causal LM (``transformers``, optionally ``peft``-wrapped) on the batch's
    device. Runs the body on ``input_ids`` and applies the head only at the N predicting
    hidden states, ``chunk_size`` at a time (``cache_bytes``: see :func:`chunked_target_logps`).
    Models whose logits are transformed after the head (softcapping, logit scaling) take
    the model's own full-logits forward instead. ``compute_dtype`` (mixed precision): the
    body runs under ``torch.autocast`` to it and the head's matmuls use it; log-softmax and
    the returned log-probs are fp32 either way, and the weights keep their own dtype.
    ``with_log_sum_sq``: also ``token_log_sum_sq`` (:func:`head_log_sum_sq`, for WPO).
    """
    lm = causal_lm(model)
    log_sum_sq = None
    attention_mask = packed_attention_mask(lm, batch) if batch.packed else batch.attention_mask
    inputs = dict(input_ids=batch.input_ids, attention_mask=attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    rows, cols, targets = batch.token_rows, batch.token_cols, batch.token_targets
    device_type = batch.input_ids.device.type
    if is_reward_model(lm):
        return _batch_rewards(lm, batch, inputs, compute_dtype)
    if _needs_full_logits(lm):
        with autocast(device_type, compute_dtype):
            logits = lm(**inputs).logits[rows, cols]
        token_logps = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # (N,) from (N, V)
        if with_log_sum_sq:
            log_sum_sq = torch.logsumexp(2 * logits.detach().float().log_softmax(-1), dim=-1)
    else:
        with autocast(device_type, compute_dtype):
            out = body(lm)(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (R, L, H)
        hidden = hidden[rows, cols]  # (N, H)
        head = lm.get_output_embeddings()
        if with_log_sum_sq:
            log_sum_sq = head_log_sum_sq(head, hidden, chunk_size, compute_dtype)
        if type(head) is nn.Linear:
            token_logps = chunked_target_logps(hidden, head.weight, head.bias, targets, chunk_size, cache_bytes,
                                               compute_dtype)
        else:
            with autocast(device_type, compute_dtype):
                token_logps = _module_head_logps(head, hidden, targets, chunk_size)
    token_logps = token_logps.float()  # (N,); already fp32 from every head path but a custom module's
    s_count = batch.num_sequences
    logps = torch.zeros(s_count, dtype=torch.float32, device=token_logps.device).index_add(
        0, batch.token_seq, token_logps)
    counts = torch.bincount(batch.token_seq, minlength=s_count)
    return LogpOutput(logps=logps, counts=counts, token_logps=token_logps, token_log_sum_sq=log_sum_sq)


def batch_group_logps(model: nn.Module, batch: Batch, chunk_size: int = 1024,
                      cache_bytes: int = DEFAULT_CACHE_BYTES,
                      compute_dtype: torch.dtype | None = None) -> GroupLogps:
    """One forward over a batch of response groups -> each response's summed and token-averaged
    log-probs, (G, K) with the validity mask (:class:`GroupLogps`). The batch is packed
    (``[prompt | r_0 | ... | r_{k-1}]``, the prompt computed once) or padded (one row per response),
    as :func:`batch_logps` runs either; arguments as there."""
    out = batch_logps(model, batch, chunk_size, cache_bytes, compute_dtype)
    return group_logps(out.logps, batch)


def is_reward_model(model: nn.Module) -> bool:
    """True for a one-logit sequence-classification model (a reward model), peft-wrapped or not."""
    lm = causal_lm(model)
    return (type(lm).__name__.endswith("ForSequenceClassification")
            and getattr(lm.config, "num_labels", None) == 1)


def _batch_rewards(lm: nn.Module, batch: Batch, inputs: dict, compute_dtype) -> LogpOutput:
    """A reward model's scalar per sequence: its head on the hidden state of the sequence's last
    token (the last completion token, EOS for completions that end with it), which has attended to
    the sequence's prompt and completion only, in the padded and the packed layout alike. As
    ``AutoModelForSequenceClassification`` scores the last non-pad token of an unpacked row."""
    with autocast(batch.input_ids.device.type, compute_dtype):
        out = body(lm)(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (R, L, H)
    S, L = batch.num_sequences, batch.input_ids.shape[1]
    # Each target token's own column: one after its predicting state's, except a packed completion's first
    # token, predicted by the prompt's last (Batch.token_target_cols says where it sits).
    target_cols = batch.token_target_cols if batch.token_target_cols is not None else batch.token_cols + 1
    flat = batch.token_rows * L + target_cols  # (N,)
    last = torch.full((S,), -1, dtype=flat.dtype, device=flat.device).scatter_reduce(
        0, batch.token_seq, flat, reduce="amax")  # (S,) flat position of each sequence's last token
    present = torch.ones(S, dtype=torch.bool, device=flat.device)  # (S,) absent: a group's missing responses
    if batch.completion_mask is not None:
        present = batch.completion_mask.to(flat.device).t().reshape(-1)
    if bool((last[present] < 0).any()):
        raise ValueError("a sequence of the batch has no completion token: a reward model scores the last one")
    head = getattr(lm, "score", None)
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no `score` head")
    last = last.clamp(min=0)  # absent responses read any state; their rewards are zeroed below
    with autocast(batch.input_ids.device.type, compute_dtype):
        rewards = head(hidden[last // L, last % L])[:, 0].float() * present  # (S,)
    counts = torch.bincount(batch.token_seq, minlength=S)
    zeros = torch.zeros(S, dtype=torch.float32, device=hidden.device)
    return LogpOutput(logps=zeros, counts=counts, token_logps=zeros.new_zeros(0), rewards=rewards)


class LogProbModel(CausalLMWrapper):
    """``batch_logps`` as a module, to be wrapped by DDP / FSDP / ``accelerator.prepare``.

    ``forward(batch) -> LogpOutput``; its parameters are the model's.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 compute_dtype: torch.dtype | None = None, with_log_sum_sq: bool = False):
        super().__init__()
        self.model = model
        self.with_log_sum_sq = with_log_sum_sq  # WPO: also log sum_v p(v)^2 per token
        self.chunk_size = chunk_size
        self.cache_bytes = cache_bytes
        self.compute_dtype = compute_dtype  # mixed precision: matmul dtype (None = the weights' dtype)
        # FSDP's transformer auto-wrap reads the layer class names from the module it is given;
        # without them it would shard the whole model as one unit (gathered all at once).
        self._no_split_modules = no_split_modules(model)

    def forward(self, batch: Batch) -> LogpOutput:
        return batch_logps(self.model, batch, self.chunk_size, self.cache_bytes, self.compute_dtype,
                           self.with_log_sum_sq)
