"""DPO and the losses of its margin: pair losses of the reference-relative log-ratio margin

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

DPO (with cDPO's label smoothing, f-DPO's divergences and RPO's NLL term), DPO-Positive, robust DPO, the
hinge loss of SLiC, IPO, EXO and DiscoPOP. Each takes four (B,) log-prob tensors and returns
``(losses, chosen_rewards, rejected_rewards)``, all (B,), rewards = beta * log-ratio, detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.methods.losses.divergences import f_divergence_margin
from preftune.methods.losses.inputs import (
    check_beta,
    check_label_smoothing,
    check_non_negative,
    check_positive,
    check_shapes,
    fp32,
    pair_logratios,
)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

        loss = -log sigmoid(beta * h)

    ``label_smoothing`` = eps > 0 gives conservative DPO (cDPO; Mitchell 2023, "A note on
    DPO with noisy preferences and relationship to IPO"), which assumes each label is
    flipped with probability eps:

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; here it acts.) ``f_divergence_type``
    replaces the log-ratios in h by f'(u) (:func:`divergences.f_divergence_scores`, f-DPO).
    ``sft_weight`` > 0 adds RPO's NLL term (:func:`rpo_loss`), and then ``chosen_nll`` is
    required. Given token-AVERAGED log-probs this is TRL's ``sigmoid_norm`` (length-normalised
    DPO, Lambert et al. 2024, "Tulu 3", §5).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs of the chosen /
            rejected completion under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: > 0, the strength of the KL penalty (0.1 in the paper).
        label_smoothing: eps in [0, 0.5).
        f_divergence_type, f_alpha_divergence_coef: see :func:`divergences.f_divergence_scores`.
        chosen_nll: (B,) token-averaged NLL of the chosen completion, for ``sft_weight``.
        sft_weight: >= 0, RPO's alpha.

    Returns:
        losses (B,), chosen_rewards (B,) = beta * (policy_chosen - ref_chosen),
        rejected_rewards (B,) = beta * (policy_rejected - ref_rejected); rewards detached.
    """
    beta = check_beta(beta)
    eps = check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type,
                                        f_alpha_divergence_coef)  # (B,) = beta * h
    losses = -F.logsigmoid(logits)
    if eps > 0:
        losses = (1 - eps) * losses - eps * F.logsigmoid(-logits)
    if sft_weight:
        if chosen_nll is None:
            raise ValueError("dpo_loss: sft_weight > 0 needs chosen_nll (the RPO term would be ignored)")
        losses = rpo_loss(losses, chosen_nll, sft_weight)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust DPO (rDPO): Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback", their unbiased (de-noised) loss.

    With h as in :func:`dpo_loss` and eps the known label-flip rate:

        loss = ((1 - eps) * -log sigmoid(beta * h) + eps * log sigmoid(-beta * h)) / (1 - 2 eps)

    Unlike cDPO this is an unbiased estimate of the clean-label DPO loss; it can be
    negative for single examples. eps = 0 is plain DPO.

    Args: as :func:`dpo_loss`; ``label_smoothing`` = eps must be in [0, 0.5).
    Returns: as :func:`dpo_loss`.
    """
    beta = check_beta(beta)
    eps = float(label_smoothing)
    if not (0.0 <= eps < 0.5):
        raise ValueError(
            f"robust DPO needs label_smoothing (the flip rate eps) in [0, 0.5): its loss divides "
            f"by 1 - 2 eps, got {label_smoothing}"
        )
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type,
                                        f_alpha_divergence_coef)  # (B,)
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinge loss of SLiC: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback", rank calibration loss max(0, delta - log p(y+|x) + log p(y-|x)).

    As in TRL, on the reference-relative log-ratios h of :func:`dpo_loss` and with the margin
    delta = 1 / beta (scaled by beta):

        loss = relu(1 - beta * h)

    Passing zeros as the reference log-probs gives SLiC's reference-free form.

    Args: as :func:`dpo_loss` (no label smoothing).
    Returns: as :func:`dpo_loss`.
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1 - beta * f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type,
                                                        f_alpha_divergence_coef))
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", eq. 17 (beta is the paper's tau):

        loss = (h - 1 / (2 * beta))^2,   h as in :func:`dpo_loss`

    The log-probs must be token-AVERAGED (sum / completion length), as the IPO authors and
    TRL do (its row in :mod:`preftune.methods.table` says so). With summed log-probs the fixed target
    1/(2 beta) would mean very different things for short and long completions.

    Args: as :func:`dpo_loss` but averaged log-probs, (B,) each.
    Returns: as :func:`dpo_loss` (rewards = beta * averaged log-ratio).
    """
    beta = check_beta(beta)
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def rpo_loss(dpo_losses: torch.Tensor, chosen_nll: torch.Tensor, alpha: float) -> torch.Tensor:
    """RPO / DPO+NLL: Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3:

        loss = dpo_loss + alpha * NLL(chosen)

    The NLL is length-normalized in the paper: pass the token-AVERAGED negative log-prob of
    the chosen completion (even though DPO itself uses summed log-probs). The paper uses
    alpha = 1. This is the remedy for the chosen log-probs falling while the margins grow;
    it is ``sft_weight`` in the config with ``loss: dpo``.

    Args:
        dpo_losses: (B,) unreduced losses from any paired loss above.
        chosen_nll: (B,) token-averaged NLL of the chosen completion (>= 0).
        alpha: >= 0.

    Returns:
        losses (B,) only.
    """
    alpha = check_non_negative(alpha, "alpha (sft_weight)")
    check_shapes(dpo_losses=dpo_losses, chosen_nll=chosen_nll)
    return fp32(dpo_losses) + alpha * fp32(chosen_nll)


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EXO (pairwise, "EXO-pref"): Ji et al. 2024, "Towards Efficient Exact Optimization of
    Language Model Alignment", eq. 16 with K = 2: KL(p_theta || p_label), where over {chosen,
    rejected} p_theta = softmax(beta * log-ratios) and the label distribution is (1 - eps, eps):

        q = sigmoid(beta * h)
        loss = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps)

    computed with log sigmoid for stability. eps = ``label_smoothing`` must be > 0 (the paper
    uses 1e-3); as in TRL. h as in :func:`dpo_loss` (f-divergences apply).

    Args: as :func:`dpo_loss`; ``label_smoothing`` = eps in (0, 1).
    Returns: as :func:`dpo_loss`.
    """
    beta = check_beta(beta)
    eps = float(label_smoothing)
    if not (0.0 < eps < 1.0):
        raise ValueError(f"exo_pair needs label_smoothing (eps) in (0, 1): log eps is its target for the rejected "
                         f"side (the EXO paper uses 1e-3), got {label_smoothing}")
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type,
                                        f_alpha_divergence_coef)  # (B,)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)  # (B,) each
    losses = (torch.exp(log_q_chosen) * (log_q_chosen - math.log1p(-eps))
              + torch.exp(log_q_rejected) * (log_q_rejected - math.log(eps)))
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiscoPOP (log-ratio modulated loss, LRML): Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", eq. 5. With x = beta * h
    (h as in :func:`dpo_loss`) and the mixing weight m = sigmoid(x / tau):

        loss = (1 - m) * -log sigmoid(x) + m * exp(-x)

    m * exp(-x) is computed as exp(log sigmoid(x / tau) - x), which equals it but stays 0
    instead of 0 * inf = NaN when x is very negative. The paper's tau is 0.05 (as TRL's default). Note
    that at x = 0 (policy == reference, the usual start) d loss / dx = (0.25 / tau)(1 - log 2) - 0.75,
    positive for tau < 0.102: descent first lowers the margin, into a local minimum near x = -0.11 at
    tau 0.05 (tests/methods/test_table.py shows it on the synthetic task).

    Args: as :func:`dpo_loss`; ``tau`` > 0 (``--discopop-tau``).
    Returns: as :func:`dpo_loss`.
    """
    beta = check_beta(beta)
    tau = check_positive(tau, "tau (discopop_tau)")
    chosen_logratios, rejected_logratios = pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type,
                                        f_alpha_divergence_coef)  # (B,)
    modulation = torch.sigmoid(logits / tau)  # (B,)
    losses = (1 - modulation) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / tau) - logits)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    dpop_lambda: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-Positive (DPOP): Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive". DPO with a penalty, inside the sigmoid, whenever the policy's chosen log-prob
    falls below the reference's:

        loss = -log sigmoid(beta * (h - lambda * max(0, ref_chosen - policy_chosen))),   h as in :func:`dpo_loss`

    DPO's loss can fall while both likelihoods fall (the margin grows as the rejected falls faster); the
    penalty makes a lower chosen likelihood cost. lambda = ``dpop_lambda`` (the paper uses 50; 0 is DPO).

    Args: as :func:`dpo_loss`; ``dpop_lambda`` >= 0.
    Returns: as :func:`dpo_loss` (rewards without the penalty).
    """
    beta = check_beta(beta)
    lam = check_non_negative(dpop_lambda, "dpop_lambda")
    chosen_logratios, rejected_logratios = pair_logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    penalty = torch.clamp(-chosen_logratios, min=0)  # (B,) max(0, ref_chosen - policy_chosen)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - lam * penalty))
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
