"""The memory policy: when to recompute activations (gradient checkpointing).

At depth, activations dominate a step's memory: a 30-layer model keeps every layer's inputs,
attention and MLP intermediates of every token until backward. ``--gradient-checkpointing
auto`` estimates the body's activation memory for the longest batch of the run and turns
checkpointing on when the estimate exceeds the budget (``--activation-budget`` GiB, by default
a quarter of the memory available when training starts), so small models stay fast and deep
models with long batches don't run out of memory. ``on`` / ``off`` force it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("preftune")

GIB = 2 ** 30


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
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
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


def decide_checkpointing(cfg, model, examples, batches: list[list[int]], packing: bool, device: torch.device,
                         compute_dtype: torch.dtype | None) -> tuple[int, str]:
    """``(every_n_layers, why)`` for ``cfg.gradient_checkpointing`` auto / on / off: 0 = off, 1 = every
    layer recomputed, n = every n-th layer (auto, when recomputing some layers is enough); ``why`` is logged."""
    mode = cfg.gradient_checkpointing
    if mode == "on":
        return 1, "--gradient-checkpointing on"
    if mode == "off":
        return 0, "--gradient-checkpointing off"
    if not getattr(model, "supports_gradient_checkpointing", False):
        return 0, f"auto: {type(model).__name__} does not support gradient checkpointing"
    weights_dtype = next(model.parameters()).dtype
    per_token = activation_bytes_per_token(model.config, compute_dtype, weights_dtype)
    # A global batch is cut into per-rank slices of batch_size: the longest slice is at most its first batch_size.
    longest = max((batch_tokens(examples, sorted(ids, key=lambda i: -examples[i].num_tokens)[:cfg.batch_size],
                                packing) for ids in batches), default=0)
    estimate = per_token * longest
    if cfg.activation_budget is not None:
        budget, source = cfg.activation_budget * GIB, f"--activation-budget {cfg.activation_budget:g} GiB"
    else:
        available = available_memory_bytes(device)
        if available is None:
            return 0, "auto: available memory unknown, so off (set --gradient-checkpointing on to save memory)"
        budget, source = available / 4, f"a quarter of the {available / GIB:.1f} GiB available"
    every = layers_between_checkpoints(estimate, budget)
    if every > 1 and not _has_every_n_layers(model):
        every = 1
    what = ("" if not every else "; recomputing every layer" if every == 1
            else f"; recomputing every {every}th layer is enough")
    return every, (f"auto: estimated activations of the longest batch ({longest} tokens x "
                   f"{per_token / 2**20:.2f} MiB/token = {estimate / GIB:.2f} GiB) {'exceed' if every else 'fit'} "
                   f"{source}{what}")


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
