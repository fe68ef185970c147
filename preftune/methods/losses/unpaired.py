"""Losses on unpaired data (one completion per example, labelled desirable or not): KTO with its
KL reference point and class-balance check, APO-zero unpaired, and BCO with its running reward
shift.

The losses take (B,) log-probs of each example's own completion and (B,) bool labels and return
``(losses, rewards, metrics)``: losses and rewards (B,), rewards detached, metrics a dict of
detached values named as TRL names them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_beta, check_positive, check_shapes, fp32


def _unpaired_logratios(policy_logps, ref_logps, labels) -> torch.Tensor:
    """(B,) r = policy - ref of each example's own completion, after checking the (B,) shapes and
    that ``labels`` is bool."""
    check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got dtype {labels.dtype}")
    return fp32(policy_logps) - fp32(ref_logps)  # (B,)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): an estimate of
    KL(policy || reference) from mismatched pairs (prompt x_i with the completion of
    another example x_j), as the HALOs code and TRL compute it:

        z0 = max(0, mean(policy_kl_logps - ref_kl_logps))

    Detached: the paper does not backpropagate through z0. Under data parallelism, take it
    with ``clamp=False`` on each process, average across processes, then clamp: that is the
    estimate of the whole global batch, the same for any number of processes (averaging
    per-process clamped values would not be). :func:`kto_loss` clamps at 0 again.

    Args:
        policy_kl_logps, ref_kl_logps: (B,) summed log-probs of the mismatched completions.
        clamp: clamp at 0 (False: the raw mean, for averaging across processes first).

    Returns:
        a 0-d tensor (float32 or wider).
    """
    check_shapes(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_kl_estimate needs at least one mismatched pair")
    mean = (fp32(policy_kl_logps) - fp32(ref_kl_logps)).mean().detach()
    return mean.clamp(min=0) if clamp else mean


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eq. 8 (numbered eq. 7 in some versions and in TRL's docs):

        r = policy_logps - ref_logps               (summed log-probs, per completion)
        desirable:   loss = w_D * (1 - sigmoid(beta * (r - z0)))
        undesirable: loss = w_U * (1 - sigmoid(beta * (z0 - r)))

    computed as w * sigmoid(-(...)), which equals 1 - sigmoid(...) without cancellation.
    z0 = ``kl`` comes from :func:`kto_kl_estimate`, already averaged across processes by
    the caller; it is detached and clamped at 0 here.

    Args:
        policy_logps, ref_logps: (B,) summed log-probs of each example's own completion.
        labels: (B,) bool, True = desirable.
        kl: z0, a 0-d tensor (or float).
        beta: > 0 (0.1 in the paper).
        desirable_weight, undesirable_weight: lambda_D, lambda_U > 0; see
            :func:`kto_weight_warning`.

    Returns:
        losses (B,), rewards (B,) = beta * r (detached), and {"kl": z0 (0-d, detached)}.
    """
    beta = check_beta(beta)
    desirable_weight = check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = check_positive(undesirable_weight, "undesirable_weight")
    logratios = _unpaired_logratios(policy_logps, ref_logps, labels)  # (B,) = r
    z0 = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device)
    if z0.numel() != 1:
        raise ValueError(f"kl must be a scalar (one z0 for the whole batch), got shape {tuple(z0.shape)}")
    z0 = z0.reshape(()).detach().clamp(min=0)
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    losses = torch.where(labels.to(logratios.device), desirable_losses, undesirable_losses)
    return losses, (beta * logratios).detach(), {"kl": z0}


def kto_weight_warning(
    num_desirable: int,
    num_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> str | None:
    """Check KTO's class balance (Ethayarajh et al. 2024, §4.3, eq. 9): the paper recommends

        1 <= (lambda_D * n_D) / (lambda_U * n_U) <= 4/3

    Returns a warning for the user when outside (or when one class is missing, which makes
    the loss degenerate), else None.
    """
    for name, count in (("num_desirable", num_desirable), ("num_undesirable", num_undesirable)):
        if int(count) != count or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count}")
    desirable_weight = check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = check_positive(undesirable_weight, "undesirable_weight")
    if num_desirable == 0 or num_undesirable == 0:
        return (
            f"KTO data has {num_desirable} desirable and {num_undesirable} undesirable examples: "
            "with only one label the KTO loss and its KL reference point degenerate; add examples "
            "of the missing label."
        )
    ratio = (desirable_weight * num_desirable) / (undesirable_weight * num_undesirable)
    if 1.0 - 1e-9 <= ratio <= 4.0 / 3.0 + 1e-9:
        return None
    low = undesirable_weight * num_undesirable / num_desirable
    return (
        f"KTO class balance (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable) = "
        f"({desirable_weight:g} * {num_desirable}) / ({undesirable_weight:g} * {num_undesirable}) = "
        f"{ratio:.3g}, outside the range [1, 4/3] the KTO paper recommends (Ethayarajh et al. 2024, "
        f"eq. 9). With undesirable_weight = {undesirable_weight:g}, set desirable_weight between "
        f"{low:.3g} and {4.0 / 3.0 * low:.3g}."
    )


def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """APO-zero, unpaired: D'Oosterlinck et al. 2024 (see :func:`anchored.apo_zero_loss`), eq. 7
    split per completion, as TRL's KTOConfig ``loss_type="apo_zero_unpaired"``. With r = policy - ref:

        desirable:   loss = w_D * (1 - sigmoid(beta * r))
        undesirable: loss = w_U * sigmoid(beta * r)

    KTO's loss without its KL reference point (no mismatched completions are needed).

    Args: as :func:`kto_loss`, without ``kl``.
    Returns: losses (B,), rewards (B,) = beta * r (detached), {}.
    """
    beta = check_beta(beta)
    desirable_weight = check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = check_positive(undesirable_weight, "undesirable_weight")
    logratios = _unpaired_logratios(policy_logps, ref_logps, labels)
    rewards = beta * logratios
    losses = torch.where(labels.to(logratios.device), desirable_weight * torch.sigmoid(-rewards),
                         undesirable_weight * torch.sigmoid(rewards))
    return losses, rewards.detach(), {}


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    reward_shift: torch.Tensor | float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", eq. 7: a binary classifier whose logit is the implicit reward r = beta *
    (policy - ref), thumbs-up completions the positive class, with the reward shift delta:

        desirable:   loss = -log sigmoid(r - delta)
        undesirable: loss = -log sigmoid(-(r - delta))

    delta (``reward_shift``) is the running mean of the batches' mean rewards
    (:func:`bco_reward_shift`), as in the paper's code and TRL's former BCOTrainer; it is
    detached. (The paper's optional density-ratio matching, UDM, needs a prompt classifier
    and is not offered.)

    Args:
        policy_logps, ref_logps: (B,) summed log-probs of each example's completion.
        labels: (B,) bool, True = desirable.
        reward_shift: delta, 0-d (or float).
        beta: > 0 (TRL's BCO default 0.1).

    Returns:
        losses (B,), rewards (B,) = r (detached), {"delta": delta (0-d)}.
    """
    beta = check_beta(beta)
    logratios = _unpaired_logratios(policy_logps, ref_logps, labels)
    delta = torch.as_tensor(reward_shift, dtype=logratios.dtype, device=logratios.device).reshape(()).detach()
    shifted = beta * logratios - delta
    losses = torch.where(labels.to(logratios.device), -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    return losses, (beta * logratios).detach(), {"delta": delta}


def bco_reward_shift(batch_mean_reward: torch.Tensor, previous: tuple[float, int] | None) -> tuple[float, int]:
    """BCO's delta: the running mean of the batches' mean rewards (one value per optimizer
    micro-batch, all batches weighing the same, as TRL's RunningMoments over batch means).

    Args:
        batch_mean_reward: 0-d, this batch's mean of beta * (policy - ref) (averaged across
            processes by the caller).
        previous: (mean, count) so far, or None before the first batch.

    Returns:
        (mean, count) including this batch: the new delta and its count.
    """
    value = float(batch_mean_reward)
    if not math.isfinite(value):
        raise ValueError(f"BCO's batch mean reward is not finite ({value})")
    if previous is None:
        return value, 1
    mean, count = previous
    return mean + (value - mean) / (count + 1), count + 1
