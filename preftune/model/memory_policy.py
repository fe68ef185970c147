"""The memory policy: when to recompute activations (gradient checkpointing), and how much of the
head's softmax to keep for backward.

At depth, activations dominate a step's memory: a 30-layer model keeps every layer's inputs,
attention and MLP intermediates of every token until backward. ``--gradient-checkpointing
auto`` estimates the body's activation memory for the longest batch of the run and compares it
with a budget: ``--activation-budget`` GiB, by default **half the step's fixed memory** (weights,
gradients, AdamW moments and the frozen reference) but at least 1 GiB, and at most a quarter of
the memory available at the start. Under the budget nothing is recomputed; a little over, every n-th layer;
far over, every layer. The rule keeps activations from becoming the largest part of the peak (at
most 1.5x the fixed memory in all), which is where TRL's default (checkpointing always on) puts a
deep model too, while small models and short batches keep full speed. ``on`` / ``off`` force it.

The head's (N, V) softmax kept from forward to backward (so backward need not redo the head
matmul) is charged against the same budget: it gets what the kept body activations leave, up to
:data:`preftune.model.logprobs.DEFAULT_CACHE_BYTES`; beyond that backward recomputes it chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from preftune.model.anatomy import text_config, text_part
from preftune.model.logprobs import DEFAULT_CACHE_BYTES

log = logging.getLogger("preftune")

GIB = 2 ** 30
MIN_BUDGET = 1 * GIB  # below this, memory is rarely what limits a run and recomputation only costs time


def activation_bytes_per_token(config, compute_dtype: torch.dtype | None, weights_dtype: torch.dtype) -> float:
    """Estimated bytes a decoder layer keeps for backward, per token, summed over the layers.

    Per layer and token a Llama-style block saves about 12 H values at residual width (two
    norms' inputs and outputs, q/k/v/o inputs and outputs, the attention output) and 5 I values
    at MLP width (gate, up, activation, product, down's input), where H = hidden size and
    I = intermediate size. Under autocast the matmul inputs are kept in the 16-bit compute
    dtype and the residual-width values in the weights' dtype: we charge the weights' bytes for
    the H terms and the compute bytes for the I terms. Attention scores are not charged (sdpa's
    fused kernels keep only a log-sum-exp per query).
    """
    text = text_part(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", 0)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 0
    wide = weights_dtype.itemsize
    narrow = compute_dtype.itemsize if compute_dtype is not None else wide
    return float(layers * (12 * hidden * wide + 5 * inter * narrow))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free GPU memory on CUDA; MemAvailable (/proc/meminfo) on CPU; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def batch_tokens(examples, ids: list[int], packing: bool) -> int:
    """Positions the body runs for a batch: tokens once per group packed, prompt repeated per completion padded
    (padding left out in both; the estimate's margin covers it)."""
    if packing:
        return sum(examples[i].num_tokens for i in ids)
    return sum(examples[i].padded_tokens for i in ids)


def layers_between_checkpoints(estimate: float, budget: float) -> int:
    """0: keep every layer's activations; n >= 1: recompute every n-th layer (1 = all).

    Recomputing every n-th layer keeps about ``(1 - 1/n)`` of the activations, so the largest n
    with ``estimate * (1 - 1/n) <= budget`` recomputes as few layers as the budget allows.
    """
    if estimate <= budget:
        return 0
    keep_share = budget / estimate  # < 1
    return max(1, int(1 / (1 - keep_share)))


def training_state_bytes(model, reference_model=None) -> int:
    """Bytes a step holds whatever the batch: every parameter of the policy, a gradient and two
    AdamW moments (in the parameter's dtype) per trained one, and the frozen reference's parameters."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.dtype.itemsize * (4 if p.requires_grad else 1)
    if reference_model is not None:
        total += sum(p.numel() * p.dtype.itemsize for p in reference_model.parameters())
    return total


def head_tokens(examples, ids: list[int]) -> int:
    """Completion tokens of a batch: the rows of the head's (N, V) softmax for a trained head."""
    return sum(len(c) for i in ids for c in examples[i].completions)


@dataclasses.dataclass
class MemoryPlan:
    every_n_layers: int  # 0: keep every layer's activations; 1: recompute all; n: every n-th layer
    head_cache_bytes: int  # the (N, V) softmax is kept for backward when it fits this
    why: str  # for the log

    @property
    def checkpointing(self) -> str:
        """The summary's label."""
        return {0: "off", 1: "every layer"}.get(self.every_n_layers, f"every {self.every_n_layers}th layer")


def plan_memory(cfg, model, examples, batches: list[list[int]], packing: bool, device: torch.device,
                compute_dtype: torch.dtype | None, state_bytes: int | None = None) -> MemoryPlan:
    """Checkpointing (``cfg.gradient_checkpointing`` auto / on / off) and the head cache for this run.

    ``state_bytes``: :func:`training_state_bytes` of the policy and reference (None: the budget is
    a quarter of the available memory alone).
    """
    weights_dtype = next(model.parameters()).dtype
    per_token = activation_bytes_per_token(model.config, compute_dtype, weights_dtype)
    # A global batch is cut into per-rank slices of batch_size: the longest slice is at most its first batch_size.
    slices = [sorted(ids, key=lambda i: -examples[i].num_tokens)[:cfg.batch_size] for ids in batches]
    longest = max((batch_tokens(examples, ids, packing) for ids in slices), default=0)
    most_head = max((head_tokens(examples, ids) for ids in slices), default=0)
    estimate = per_token * longest
    budget, source = _budget(cfg, device, state_bytes)

    mode = cfg.gradient_checkpointing
    if mode in ("on", "off"):
        every, why = (1 if mode == "on" else 0), f"--gradient-checkpointing {mode}"
    elif not getattr(model, "supports_gradient_checkpointing", False):
        every, why = 0, f"auto: {type(model).__name__} does not support gradient checkpointing"
    elif budget is None:
        every, why = 0, "auto: available memory unknown, so off (set --gradient-checkpointing on to save memory)"
    else:
        every = layers_between_checkpoints(estimate, budget)
        if every > 1 and not _has_every_n_layers(model):
            every = 1
        what = ("" if not every else "; recomputing every layer" if every == 1
                else f"; recomputing every {every}th layer is enough")
        why = (f"auto: estimated activations of the longest batch ({longest} tokens x "
               f"{per_token / 2**20:.2f} MiB/token = {estimate / GIB:.2f} GiB) {'exceed' if every else 'fit'} "
               f"{source}{what}")

    kept = 0.0 if every == 1 else estimate * (1 - 1 / every) if every else estimate
    # Forced off: the user chose speed over memory, so the head keeps its full cache too.
    cache = (DEFAULT_CACHE_BYTES if budget is None or mode == "off"
             else int(min(DEFAULT_CACHE_BYTES, max(0.0, budget - kept))))
    vocab = getattr(text_config(model), "vocab_size", 0)
    softmax = most_head * vocab * (compute_dtype or weights_dtype).itemsize
    if softmax > cache:
        why += (f"; the head's softmax ({most_head} completion tokens x {vocab} = {softmax / GIB:.2f} GiB) "
                f"is recomputed in backward (cache {cache / 2**20:.0f} MiB)")
    return MemoryPlan(every, cache, why)


def _budget(cfg, device: torch.device, state_bytes: int | None) -> tuple[float | None, str]:
    """The activation budget in bytes and a phrase saying where it came from (None: unknown)."""
    if cfg.activation_budget is not None:
        return cfg.activation_budget * GIB, f"--activation-budget {cfg.activation_budget:g} GiB"
    available = available_memory_bytes(device)
    quarter = available / 4 if available is not None else None
    half_state = max(state_bytes / 2, MIN_BUDGET) if state_bytes else None
    if half_state is not None and (quarter is None or half_state <= quarter):
        if half_state == MIN_BUDGET:
            return half_state, f"the auto budget's floor of {MIN_BUDGET / GIB:g} GiB"
        return half_state, (f"half the step's fixed {state_bytes / GIB:.2f} GiB (weights, gradients, AdamW "
                            f"moments, reference)")
    if quarter is not None:
        return quarter, f"a quarter of the {available / GIB:.1f} GiB available"
    return None, "unknown"


def _has_every_n_layers(model) -> bool:
    import inspect

    enable = getattr(model, "activation_checkpointing_enable", None)
    return enable is not None and "every_n_layers" in inspect.signature(enable).parameters


def enable_checkpointing(model, every_n_layers: int) -> None:
    """Recompute every ``every_n_layers``-th decoder layer in backward (non-reentrant checkpoints)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        kwargs = {"every_n_layers": every_n_layers} if every_n_layers > 1 else {}
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, **kwargs)
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
