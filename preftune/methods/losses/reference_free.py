"""Pair losses without a reference model, on the policy's own log-probs: ORPO, SimPO and CPO
(CPO-SimPO being CPO on token-averaged log-probs with SimPO's margin).

Each returns ``(losses, chosen_rewards, rejected_rewards)``, all (B,), rewards detached, and
ORPO and CPO a 4th element, a dict of detached metrics named as TRL names them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import (
    check_beta,
    check_finite,
    check_label_smoothing,
    check_non_negative,
    check_shapes,
    fp32,
)

# ORPO: log-probs above this are clamped before log(1 - p), so p == 1 exactly (an averaged
# log-prob of 0, which fp32 log-softmax can produce) gives a large finite log-odds, not inf.
_ORPO_MAX_LOGP = -1e-12
# ORPO: averaged log-probs above this cannot be log-probabilities (an NLL passed by mistake?).
_ORPO_POSITIVE_TOLERANCE = 1e-3


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) far from it.

    Each branch sees a clamped input, so the branch torch.where does not pick cannot
    produce an inf whose zero-weighted gradient would be NaN.
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", eq. 6-7:

        odds(y|x) = P(y|x) / (1 - P(y|x)),  log P(y|x) = token-AVERAGED log-prob (< 0)
        log_odds  = logp - log(1 - exp(logp))
        L_OR      = -log sigmoid(log_odds(chosen) - log_odds(rejected))
        loss      = L_SFT + lambda_ * L_OR,   L_SFT = chosen_nll

    log(1 - exp(logp)) is computed in (at least) float32 by a two-branch log1mexp, so it
    is accurate for logp -> 0 (P -> 1) and for very negative logp. Log-probs in
    (-1e-12, 1e-3] are clamped to -1e-12 (P == 1 would give an infinite log-odds);
    larger ones are not log-probabilities and raise ValueError (this check costs one
    device-to-host sync per call).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) token-averaged log-probs.
        chosen_nll: (B,) the SFT term, normally -policy_chosen_logps (token-averaged NLL).
        lambda_: >= 0, the weight of the odds-ratio term (0.1 in the paper).

    Returns a 4-tuple:
        losses (B,); chosen_rewards (B,) = lambda_ * policy_chosen_logps and
        rejected_rewards (B,) = lambda_ * policy_rejected_logps (as TRL logs them, with
        its beta = our lambda_); and a dict of detached (B,) metrics:
        ``nll_loss`` (chosen_nll), ``or_loss`` (L_OR), ``log_odds_ratio``
        (log_odds(chosen) - log_odds(rejected)), ``log_odds_chosen`` (log_odds(chosen)).
        Note TRL's metric of the same name "log_odds_ratio" is log sigmoid of ours.
    """
    lambda_ = check_non_negative(lambda_, "lambda_ (orpo_lambda)")
    check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_nll=chosen_nll,
    )
    chosen_logps = fp32(policy_chosen_logps)  # (B,)
    rejected_logps = fp32(policy_rejected_logps)  # (B,)
    largest = torch.maximum(chosen_logps.detach().max(), rejected_logps.detach().max())
    if largest.item() > _ORPO_POSITIVE_TOLERANCE:
        raise ValueError(
            f"ORPO needs token-averaged log-probs (<= 0), got a value of {largest.item():.4g}; "
            "was a negative log-likelihood passed instead?"
        )

    def log_odds(logps: torch.Tensor) -> torch.Tensor:
        return logps - _log1mexp(logps.clamp(max=_ORPO_MAX_LOGP))

    log_odds_chosen = log_odds(chosen_logps)  # (B,)
    log_odds_ratio = log_odds_chosen - log_odds(rejected_logps)  # (B,)
    or_losses = -F.logsigmoid(log_odds_ratio)  # (B,)
    nll = fp32(chosen_nll)
    losses = nll + lambda_ * or_losses
    metrics = {
        "nll_loss": nll.detach(),
        "or_loss": or_losses.detach(),
        "log_odds_ratio": log_odds_ratio.detach(),
        "log_odds_chosen": log_odds_chosen.detach(),
    }
    return losses, (lambda_ * chosen_logps).detach(), (lambda_ * rejected_logps).detach(), metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    gamma: float,
    chosen_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6:

        loss = -log sigmoid(beta * avg_chosen - beta * avg_rejected - gamma)

    with token-AVERAGED log-probs (avg = sum / length) and no reference model.
    ``gamma`` is the paper's target reward margin, taken directly (TRL and the SimPO code
    instead take gamma_beta_ratio and set gamma = gamma_beta_ratio * beta; the paper's
    settings have gamma / beta around 0.5, e.g. beta 2.0, gamma 1.0).

    ``sft_weight`` > 0 adds sft_weight * chosen_nll (CPO-SimPO style SFT term), and then
    ``chosen_nll`` is required.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) token-averaged log-probs.
        beta: > 0 (2.0-2.5 in the paper).
        gamma: the margin (about 1.0-1.6 in the paper).
        chosen_nll: (B,) token-averaged NLL of the chosen completion, or None.
        sft_weight: >= 0.

    Returns:
        losses (B,), chosen_rewards (B,) = beta * avg_chosen,
        rejected_rewards (B,) = beta * avg_rejected; rewards detached.
    """
    beta = check_beta(beta)
    gamma = check_finite(gamma, "gamma (simpo_gamma)")
    sft_weight = check_non_negative(sft_weight, "sft_weight")
    check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_rewards = beta * fp32(policy_chosen_logps)  # (B,)
    rejected_rewards = beta * fp32(policy_rejected_logps)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    if sft_weight > 0:
        if chosen_nll is None:
            raise ValueError("simpo_loss: sft_weight > 0 needs chosen_nll (the SFT term would be ignored)")
        check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
        losses = losses + sft_weight * fp32(chosen_nll)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_token_nll: torch.Tensor,
    beta: float,
    cpo_alpha: float = 1.0,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """CPO: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", eq. 3 (reference-free DPO) plus its NLL term:

        x = beta * (policy_chosen - policy_rejected) - gamma
        loss = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x) + cpo_alpha * NLL

    With summed log-probs and gamma = 0 this is CPO (``--loss cpo``); with token-AVERAGED
    log-probs and the margin gamma it is CPO-SimPO (``--loss cpo_simpo``; TRL's CPOConfig
    ``loss_type="simpo"``, whose gamma_beta_ratio-free form is -log sigmoid(beta * avg margin
    - simpo_gamma)). eps is TRL's ``label_smoothing`` (0 in the paper).

    The NLL is TRL's: the mean over all chosen-completion tokens of the batch (one number,
    ``chosen_token_nll``), not the paper's per-sequence sum: CPO's authors trained with TRL's
    form, and it is the one users rely on.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed (CPO) or token-averaged
            (CPO-SimPO) log-probs.
        chosen_token_nll: 0-d, -sum of chosen token log-probs / number of chosen tokens.
        beta: > 0 (0.1 in TRL's CPOConfig).
        cpo_alpha: >= 0, the NLL weight (1.0 in the paper and TRL).
        gamma: the SimPO margin (0 for CPO).
        label_smoothing: eps in [0, 0.5).

    Returns:
        losses (B,), chosen_rewards (B,) = beta * policy_chosen, rejected_rewards (B,) =
        beta * policy_rejected (TRL's), and {"nll_loss": the NLL (0-d)}; detached.
    """
    beta = check_beta(beta)
    cpo_alpha = check_non_negative(cpo_alpha, "cpo_alpha")
    eps = check_label_smoothing(label_smoothing)
    gamma = check_finite(gamma, "gamma (simpo_gamma)")
    check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nll = fp32(torch.as_tensor(chosen_token_nll)).reshape(())
    chosen_rewards = beta * fp32(policy_chosen_logps)  # (B,)
    rejected_rewards = beta * fp32(policy_rejected_logps)  # (B,)
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits) + cpo_alpha * nll
    return losses, chosen_rewards.detach(), rejected_rewards.detach(), {"nll_loss": nll.detach()}
