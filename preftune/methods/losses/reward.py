"""The Bradley-Terry loss of a reward model, on the scalar rewards of its classification head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_non_negative, check_shapes, fp32


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bradley-Terry reward-model loss: Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback", eq. 1 (Stiennon et al. 2020 before them), with TRL's
    RewardTrainer options:

        loss_i = -log sigmoid(r(x, y_c) - r(x, y_r) - m_i) + c * (r(x, y_c) + r(x, y_r))^2

    ``m_i`` is the pair's ``margin`` (Touvron et al. 2023, Llama 2, eq. 2: how much better the
    chosen response is; 0 without one) and ``c`` is ``center_rewards_coefficient``
    (Eisenstein et al. 2023, "Helping or Herding?": keeps rewards centred at 0; None or 0 = off).
    The mean over pairs equals TRL's ``-logsigmoid(rc - rr - m).mean() + c * mean((rc + rr)^2)``.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the reward model's head.
        margins: (B,) or None.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, rewards detached.
    """
    check_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen, rejected = fp32(chosen_rewards), fp32(rejected_rewards)
    delta = chosen - rejected
    if margins is not None:
        check_shapes(chosen_rewards=chosen_rewards, margins=margins)
        delta = delta - fp32(margins)
    losses = -F.logsigmoid(delta)
    if center_rewards_coefficient:
        check_non_negative(center_rewards_coefficient, "center_rewards_coefficient")
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses, chosen.detach(), rejected.detach()
