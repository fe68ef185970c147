"""Pair losses that score each completion's reward on its own, anchored at the reference
(r = beta * (policy - ref) of the chosen and of the rejected completion, not only their
margin): NCA, BCO on pairs, SPPO with hard labels, APO-zero and APO-down.

Each takes four (B,) log-prob tensors and returns ``(losses, chosen_rewards, rejected_rewards)``,
all (B,), rewards detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_beta, pair_logratios


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NCA (pairwise): Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", the NCA loss with K = 2 responses. With r = beta * log-ratio:

        loss = -log sigmoid(r_chosen) - 1/2 log sigmoid(-r_chosen) - 1/2 log sigmoid(-r_rejected)

    Each reward is scored on its own (not only the margin), so unlike DPO it keeps the chosen
    likelihood from falling. As in TRL.

    Args: as :func:`pairwise.dpo_loss` (beta only).
    Returns: as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # (B,) each
    losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
              - 0.5 * F.logsigmoid(-rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCO on pairs: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", eq. 7 without its reward shift delta, as TRL's ``bco_pair``: the chosen completion
    classified as good and the rejected one as bad, with r = beta * log-ratio:

        loss = -log sigmoid(r_chosen) - log sigmoid(-r_rejected)

    The paper's form with the running reward shift delta is the unpaired :func:`unpaired.bco_loss`
    (``--loss bco``); TRL users rely on this one under this name.

    Args: as :func:`pairwise.dpo_loss` (beta only).
    Returns: as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPPO, hard labels: Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", eq. 4.7 with the win probability P set to 1 for the chosen and 0 for the
    rejected completion and eta = 1 / beta:

        loss = (log-ratio_chosen - 1 / (2 beta))^2 + (log-ratio_rejected + 1 / (2 beta))^2

    The paper estimates P with a preference model (PairRM) outside the trainer; this is the
    form TRL offers (``sppo_hard``) for plain preference pairs.

    Args: as :func:`pairwise.dpo_loss` (beta only).
    Returns: as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APO-zero: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", eq. 7: for chosen completions better than the model's own outputs, raise the
    chosen likelihood and lower the rejected one, each anchored at the reference:

        loss = (1 - sigmoid(beta * log-ratio_chosen)) + sigmoid(beta * log-ratio_rejected)

    Args: as :func:`pairwise.dpo_loss` (beta only).
    Returns: as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = torch.sigmoid(-chosen_rewards) + torch.sigmoid(rejected_rewards)  # 1 - sigmoid(x) = sigmoid(-x)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APO-down: D'Oosterlinck et al. 2024 (as :func:`apo_zero_loss`), eq. 8: for chosen
    completions *worse* than the model's own outputs, lower both likelihoods, the rejected
    one more:

        loss = sigmoid(beta * log-ratio_chosen) + (1 - sigmoid(beta * (log-ratio_chosen - log-ratio_rejected)))

    It lowers the chosen likelihood on purpose, so it is not meant to make a model prefer
    chosen completions it could not write (the synthetic-rule test says so).

    Args: as :func:`pairwise.dpo_loss` (beta only).
    Returns: as :func:`pairwise.dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards - chosen_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
