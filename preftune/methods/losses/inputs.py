"""What every loss does to its inputs first: check the options (beta, label smoothing, weights),
check that the tensors are (B,) of one shape, upcast fp16/bf16 to float32, and form the
policy/reference log-ratios of a pair.

Public to the loss modules of this package; nothing here is a loss.
"""

from __future__ import annotations

import math

import torch


def check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(
            f"{name} must be > 0 ({name} = 0 makes DPO's loss stuck at log 2 = 0.6931 and the "
            f"rewards at 0, and IPO's target 1/(2 {name}) infinite), got {beta}"
        )
    return beta


def check_label_smoothing(label_smoothing: float) -> float:
    eps = float(label_smoothing)
    if not (0.0 <= eps < 0.5):
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (it is the assumed probability that a preference "
            f"label is flipped; at 0.5 the labels carry no information), got {label_smoothing}"
        )
    return eps


def check_non_negative(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_shapes(**tensors: torch.Tensor) -> None:
    """All tensors must be 1-D and of one shape (B,): silent broadcasting to (B, B) is a bug."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {listed}")


def fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to float32; leave float32/float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def pair_logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) policy/reference log-ratios of the chosen and of the rejected completions."""
    check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = fp32(policy_chosen_logps) - fp32(ref_chosen_logps)
    rejected_logratios = fp32(policy_rejected_logps) - fp32(ref_rejected_logps)
    return chosen_logratios, rejected_logratios
