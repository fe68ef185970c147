"""AOT (Melnyk et al. 2024): pair losses on the batch's distribution of margins or log-ratios,
matched by rank (sorting) instead of pair by pair, so loss i belongs to the i-th smallest value.

Each takes four (B,) log-prob tensors and returns ``(losses, chosen_rewards, rejected_rewards)``,
all (B,), rewards per pair and detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_beta, check_label_smoothing, fp32, pair_logratios


def _sorted_logistic(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """(B,) -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)."""
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AOT (paired): Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", the paired objective: first-order stochastic dominance of the policy's margins
    over the reference's, a 1-D optimal-transport problem solved by sorting within the batch:

        m = sort(policy_chosen - policy_rejected),  m_ref = sort(ref_chosen - ref_rejected)
        loss_i = -(1 - eps) log sigmoid(beta (m_i - m_ref_i)) - eps log sigmoid(-beta (m_i - m_ref_i))

    Loss i belongs to the i-th smallest margin, not to pair i: the value depends on the whole
    (per-process) batch, so WPO's per-pair weights do not apply. As in TRL.

    Args: as :func:`pairwise.dpo_loss`; ``label_smoothing`` = eps in [0, 0.5).
    Returns: losses (B,) in sorted order; rewards per pair as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    eps = check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    policy_margins = fp32(policy_chosen_logps) - fp32(policy_rejected_logps)  # (B,)
    ref_margins = fp32(ref_chosen_logps) - fp32(ref_rejected_logps)  # (B,)
    delta = torch.sort(policy_margins).values - torch.sort(ref_margins).values
    losses = _sorted_logistic(delta, beta, eps)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AOT (unpaired): Melnyk et al. 2024 (as :func:`aot_loss`), the unpaired objective: the
    distribution of chosen log-ratios should dominate that of rejected log-ratios:

        delta = sort(log-ratio_chosen) - sort(log-ratio_rejected)
        loss_i = -(1 - eps) log sigmoid(beta delta_i) - eps log sigmoid(-beta delta_i)

    The data are still pairs (TRL's ``aot_unpaired``); only the matching is by rank.

    Args: as :func:`pairwise.dpo_loss`; ``label_smoothing`` = eps in [0, 0.5).
    Returns: losses (B,) in sorted order; rewards per pair as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    eps = check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    losses = _sorted_logistic(delta, beta, eps)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
