"""From per-sequence log-probs to one method's loss and metrics.

This is the only place where methods differ inside the loop: it picks the inputs each
pure loss in :mod:`preftune.losses` wants (summed or token-averaged log-probs, chosen
NLL, KTO's KL point) and names the metrics the way TRL users know them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import losses as L
from .logprobs import LogpOutput

# Metrics every method logs (others add their own).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def compute_objective(
    method: str,
    policy: LogpOutput,
    num_groups: int,
    ref_logps: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    orpo_lambda: float = 0.1,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    mean_across_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (a scalar with grad) and detached scalar metrics for one batch.

    ``policy.logps`` / ``policy.counts`` are (S,) with S = K * G (see :mod:`preftune.batch`);
    ``ref_logps`` (S,) summed reference log-probs, or None for reference-free methods.
    ``mean_across_processes`` averages KTO's KL point over data-parallel ranks.
    """
    G = num_groups
    logps, counts = policy.logps, policy.counts.clamp(min=1)
    mean_logps = logps / counts

    if method == "sft":
        # Token-level mean NLL over the batch (every completion token weighs the same).
        loss = -logps.sum() / counts.sum()
        return loss, {"loss": loss.detach(), "nll": loss.detach()}

    if method == "kto":
        own, partner = logps[:G], logps[G:]
        ref_own, ref_partner = ref_logps[:G], ref_logps[G:]
        # z0 = max(0, mean over ALL ranks' mismatched pairs): average the unclamped local means
        # (equal counts per rank), then clamp — clamping per rank first would bias z0 upwards.
        kl = mean_across_processes(L.kto_kl_estimate(partner, ref_partner, clamp=False)).clamp(min=0)
        losses, rewards, extra = L.kto_loss(own, ref_own, labels, kl, beta, desirable_weight, undesirable_weight)
        loss = losses.mean()
        metrics = {"loss": loss.detach(), "kl": kl}
        metrics.update(_kto_metrics(rewards, own.detach(), labels))
        return loss, metrics

    chosen, rejected = logps[:G], logps[G:2 * G]
    chosen_nll = -mean_logps[:G]  # (G,) token-averaged NLL of the chosen completion
    extra: dict[str, torch.Tensor] = {}
    if method in ("dpo", "robust", "hinge", "ipo"):
        if ref_logps is None:
            raise ValueError(f"--loss {method} needs reference log-probs")
        ref_chosen, ref_rejected = ref_logps[:G], ref_logps[G:2 * G]
        if method == "ipo":  # IPO compares token-averaged log-probs (Azar et al. 2023; as TRL)
            losses, rc, rr = L.ipo_loss(mean_logps[:G], mean_logps[G:2 * G],
                                        ref_chosen / counts[:G], ref_rejected / counts[G:2 * G], beta)
        elif method == "dpo":
            losses, rc, rr = L.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
            if sft_weight:
                losses = L.rpo_loss(losses, chosen_nll, sft_weight)
        elif method == "robust":
            losses, rc, rr = L.robust_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
        else:
            losses, rc, rr = L.hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    elif method == "orpo":
        losses, rc, rr, extra = L.orpo_loss(mean_logps[:G], mean_logps[G:2 * G], chosen_nll, orpo_lambda)
    elif method == "simpo":
        losses, rc, rr = L.simpo_loss(mean_logps[:G], mean_logps[G:2 * G], beta, simpo_gamma,
                                      chosen_nll=chosen_nll, sft_weight=sft_weight)
    else:
        raise ValueError(f"unknown method {method!r}")

    loss = losses.mean()
    metrics = {"loss": loss.detach()}
    metrics.update(pair_metrics(rc, rr, chosen.detach(), rejected.detach()))
    metrics["nll"] = chosen_nll.detach().mean()
    for key, value in extra.items():
        metrics[key] = value.detach().float().mean()
    return loss, metrics


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """TRL-named batch means: rewards/*, logps/* (summed log-probs)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


def _kto_metrics(rewards, logps, labels) -> dict[str, torch.Tensor]:
    """KTO logs desirable rewards as rewards/chosen and undesirable as rewards/rejected.

    A batch with no example of one label reports NaN for that side; the loop averages with
    ``nanmean`` so it never pollutes the logged value.
    """
    labels = labels.bool()
    nan = torch.tensor(float("nan"), device=rewards.device)
    chosen = rewards[labels].mean() if labels.any() else nan
    rejected = rewards[~labels].mean() if (~labels).any() else nan
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": logps[labels].mean() if labels.any() else nan,
        "logps/rejected": logps[~labels].mean() if (~labels).any() else nan,
    }
