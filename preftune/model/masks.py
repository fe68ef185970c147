"""Attention masks of packed batches, in the form each attention implementation takes.

Packed batches carry a (R, 1, L, L) bool mask; it reaches the attention layers unchanged
because ``transformers.masking_utils`` returns a 4D mask as-is (so its "position ids
restart => new sequence" detection never runs). It is converted per attention
implementation: ``sdpa`` additive float (0 / -inf: the mask ``scaled_dot_product_attention`` would
build from a bool mask in every layer's call, built once per batch here), ``eager`` additive float
(0 / dtype min),
``flex_attention`` a ``BlockMask``. Flash attention cannot take it. Sliding-window layers get
the window folded into the mask, measured in position ids (= distance within the unpacked
sequence).

Whether a model can run packed batches at all is decided once, by a probe forward, when the
batch builder is made (:mod:`preftune.model.packing`); a refusal is recorded on the model, and
:func:`packed_attention_mask` raises on it instead of running a packed batch the model would
get wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.data.batch import Batch
from preftune.model.anatomy import attention_implementation, causal_lm, sliding_layout, text_config

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")
# Attribute of the causal LM holding why packing was refused (set by preftune.model.packing).
REFUSAL_ATTR = "_preftune_packing_refused"


def record_packing_decision(model: nn.Module, ok: bool, why: str) -> None:
    """Note on ``model`` whether it may run packed batches (``why``: the reason of a refusal)."""
    lm = causal_lm(model)
    if ok:
        lm.__dict__.pop(REFUSAL_ATTR, None)
    else:
        lm.__dict__[REFUSAL_ATTR] = why


def packed_attention_mask(model: nn.Module, batch: Batch):
    """The packed batch's mask in the form ``model``'s attention takes (see :func:`build_packed_mask`).

    Raises ValueError when packing was refused for ``model`` (the decision recorded by
    :func:`preftune.model.packing.supports_packing`; no probe runs here) or its attention
    implementation takes no custom mask.
    """
    lm = causal_lm(model)
    refusal = lm.__dict__.get(REFUSAL_ATTR)
    if refusal:
        raise ValueError(f"cannot run a packed batch: {refusal}")
    return build_packed_mask(lm, batch)


def build_packed_mask(model: nn.Module, batch: Batch, layer_dict: bool = False):
    """The packed batch's (R, 1, L, L) bool mask in the form ``model``'s attention takes; unchecked.

    No check of a recorded refusal (:func:`packed_attention_mask` makes it): sliding-window
    layers get the window folded in (measured in position ids); a model mixing full and
    sliding layers gets a dict per layer type when the window bites, or always with
    ``layer_dict`` (the packing probe: does the body take one?).
    """
    lm = causal_lm(model)
    impl = attention_implementation(lm)
    dtype = lm.get_input_embeddings().weight.dtype
    mask = batch.attention_mask
    window, layer_types = sliding_layout(text_config(lm))
    mixed = layer_types is not None and "full_attention" in layer_types
    bites = window is not None and int(batch.position_ids.max()) + 1 > window  # longest sequence > window
    sliding = mask
    if bites:
        pos = batch.position_ids
        sliding = mask & ((pos[:, :, None] - pos[:, None, :]) < window).unsqueeze(1)  # q - kv < window
    if mixed and (bites or layer_dict):
        return {"full_attention": _convert_mask(mask, impl, dtype),
                "sliding_attention": _convert_mask(sliding, impl, dtype)}
    return _convert_mask(sliding, impl, dtype)


def _convert_mask(mask: torch.Tensor, impl: str, dtype: torch.dtype):
    """(R, 1, L, L) bool (True = attend) -> what ``impl`` takes.

    ``sdpa``: exactly the float mask ``scaled_dot_product_attention`` makes of a bool one (0 where
    attended, -inf elsewhere, in the query dtype), so the outputs are the same bit for bit; made
    once here instead of in each layer's attention call (forward and backward of every layer).
    """
    if impl == "sdpa":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        dense = mask[:, 0]
        rows, length = dense.shape[0], dense.shape[-1]

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[b, q_idx, kv_idx]

        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=mask.device)
    raise ValueError(f"attention {impl!r} cannot take a packed batch; use padded batches")
