"""Supervised fine-tuning: the negative log-likelihood of the completion tokens."""

from __future__ import annotations

import torch

from preftune.methods.losses.inputs import check_shapes, fp32


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """SFT: the negative log-likelihood of the completion tokens, one mean over every token of
    the batch (each token weighs the same, as TRL's SFT and its DPO ``loss_type="sft"``):

        loss = -sum_i policy_chosen_logps_i / sum_i chosen_counts_i

    Args:
        policy_chosen_logps: (B,) SUMMED log-probs of each (chosen) completion.
        chosen_counts: (B,) its number of tokens.

    Returns:
        losses (B,), every entry the batch's loss (so a mean, or a per-pair weighting, treats
        it like any other loss).
    """
    check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_counts=chosen_counts)
    loss = -fp32(policy_chosen_logps).sum() / chosen_counts.sum().clamp(min=1)
    return loss.expand(policy_chosen_logps.shape[0])
