"""Prepacked bf16 linear layers for decoding on the CPU.

A decode step multiplies a few rows (one token per sequence) by every weight matrix of the model, so
its time is reading the weights. ``F.linear`` on bf16 CPU tensors hands the weight to oneDNN in its
plain layout on every call, and oneDNN reorders it into its blocked layout each time: measured on
SmolLM2-135M's shapes (576 x 1536, 2 cores with AMX), 1.6-2.5x the time of a multiply by a weight
reordered once (``torch.ops.mkldnn._reorder_linear_weight``, the layout ``torch.compile`` freezing
uses). :func:`packed_linears` swaps every ``nn.Linear`` of a model for a :class:`PackedLinear` holding
that reordered bf16 copy for the length of a block, and puts the originals back afterwards.

The arithmetic is autocast's: the input is cast to bf16, the product accumulates in fp32 and comes out
in bf16 (bit-equal to ``F.linear`` on the same bf16 tensors in the probe). The copies cost 2 bytes per
weight while the block runs; the model's own weights are untouched. Used where the caller computes in
bf16 on a CPU whose PyTorch build has oneDNN bf16 (checked once by a probe); everywhere else it does
nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def packing_works() -> bool:
    """Whether this PyTorch build reorders and multiplies bf16 weights through oneDNN on this CPU:
    a probe product compared with ``F.linear`` (bit-equal expected)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(torch.bfloat16)
        bias = torch.randn(24, generator=generator).to(torch.bfloat16)
        x = torch.randn(3, 16, generator=generator).to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.equal(got, nn.functional.linear(x, weight, bias)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s weight (and bias) as a oneDNN-reordered bf16 copy; (..., in) -> (..., out) bf16."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, max(1, batch_hint))
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.packed_bias, "none", [], "")


def _plain_cpu_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]] | None:
    """Every ``(parent, name, linear)`` of the model, or None when the model is not plain CPU tensors
    (meta or other devices, sharded or offloaded parameters: those are left alone)."""
    if any(type(p) is not nn.Parameter or p.device.type != "cpu" for p in model.parameters()):
        return None
    found = []
    for parent in model.modules():
        if hasattr(parent, "_hf_hook"):
            return None
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                found.append((parent, name, child))
    return found


@contextlib.contextmanager
def packed_linears(model: nn.Module, compute_dtype: torch.dtype | None, batch_hint: int = 16):
    """Inside the block, the model's ``nn.Linear`` layers multiply with prepacked bf16 weights when the
    computation is bf16 (``compute_dtype`` bf16, or None with bf16 weights) on a CPU that supports it;
    otherwise the block runs the model as it is. Only for inference (no gradient reaches the copies)."""
    weights_dtype = next(model.parameters()).dtype
    wanted = (compute_dtype or weights_dtype) == torch.bfloat16
    linears = _plain_cpu_linears(model) if wanted and packing_works() else None
    if not linears:
        yield
        return
    for parent, name, linear in linears:
        setattr(parent, name, PackedLinear(linear, batch_hint))
    try:
        yield
    finally:
        for parent, name, linear in linears:
            setattr(parent, name, linear)
