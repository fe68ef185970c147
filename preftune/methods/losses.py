"""Preference losses: one pure function per method, on per-sequence log-probs.

Every pair loss takes (B,) tensors of per-sequence log-probs (one value per completion)
and returns ``(losses, chosen_rewards, rejected_rewards)``, all (B,), sometimes with a 4th
element, a dict of detached per-example metrics named as TRL names them:

* ``losses`` is unreduced: the caller takes the mean (and averages across processes).
* rewards are detached; they are for logging only.

Unpaired losses (KTO, BCO, APO-zero unpaired) return ``(losses, rewards, metrics)``;
:func:`rpo_loss` and :func:`sft_loss` return losses only.

Which log-probs each method is given — *summed* over the completion's tokens or *averaged*
(divided by the completion length) — whether it needs a reference model, its data kind, its
options and its paper are one row of the method table, :mod:`preftune.methods.table`. Everything
is computed in float32 at least (fp16/bf16 inputs are upcast; float64 stays float64), and
the results come back in that dtype.

Nothing here touches a model, a device or global state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# f-divergences of f-DPO (Wang et al. 2023); see :func:`f_divergence_scores`.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# ORPO: log-probs above this are clamped before log(1 - p), so p == 1 exactly (an averaged
# log-prob of 0, which fp32 log-softmax can produce) gives a large finite log-odds, not inf.
_ORPO_MAX_LOGP = -1e-12
# ORPO: averaged log-probs above this cannot be log-probabilities (an NLL passed by mistake?).
_ORPO_POSITIVE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- helpers


def _check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(
            f"{name} must be > 0 ({name} = 0 makes DPO's loss stuck at log 2 = 0.6931 and the "
            f"rewards at 0, and IPO's target 1/(2 {name}) infinite), got {beta}"
        )
    return beta


def _check_label_smoothing(label_smoothing: float) -> float:
    eps = float(label_smoothing)
    if not (0.0 <= eps < 0.5):
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (it is the assumed probability that a preference "
            f"label is flipped; at 0.5 the labels carry no information), got {label_smoothing}"
        )
    return eps


def _check_non_negative(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_shapes(**tensors: torch.Tensor) -> None:
    """All tensors must be 1-D and of one shape (B,): silent broadcasting to (B, B) is a bug."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {listed}")


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to float32; leave float32/float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) policy/reference log-ratios of the chosen and of the rejected completions."""
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = _fp32(policy_chosen_logps) - _fp32(ref_chosen_logps)
    rejected_logratios = _fp32(policy_rejected_logps) - _fp32(ref_rejected_logps)
    return chosen_logratios, rejected_logratios


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


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """f-DPO: Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints", Theorem 1: under an f-divergence the implicit reward
    is beta * f'(u) with u = pi / pi_ref, so DPO-type losses compare f'(u) instead of log u:

        reverse_kl        f'(u) = log u                    (plain DPO)
        forward_kl        f'(u) = 1 - 1/u                  (the paper's -1/u plus 1: the constant
                                                            cancels in chosen - rejected)
        js_divergence     f'(u) = log 2 + log sigmoid(log u)
        alpha_divergence  f'(u) = (u^(a-1) - 1) / (a - 1),  a = f_alpha_divergence_coef

    The alpha form is TRL's parameterisation (its ``f_alpha_divergence_coef``; the paper's
    (1 - u^-alpha) / alpha has alpha = 1 - a); a -> 1 is reverse KL, and as in TRL the exponent
    (a - 1) log u is clamped at 80 so exp stays finite in float32.

    Args:
        logratios: (B,) log u = policy log-prob - reference log-prob (float32 or wider).
        f_divergence_type: one of :data:`F_DIVERGENCES`.
        f_alpha_divergence_coef: a, for alpha_divergence only.

    Returns:
        (B,) the scores f'(u), same dtype.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        coef = float(f_alpha_divergence_coef)
        if not math.isfinite(coef):
            raise ValueError(f"f_alpha_divergence_coef must be finite, got {coef}")
        if abs(coef - 1.0) < 1e-6:  # the limit (u^0 - 1) / 0 -> log u
            return logratios
        return (torch.exp(((coef - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (coef - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence_type!r}")


def _score_margin(chosen_logratios, rejected_logratios, f_divergence_type, f_alpha_divergence_coef):
    """(B,) f'(u_chosen) - f'(u_rejected): the h of DPO, generalised by :func:`f_divergence_scores`."""
    return (f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
            - f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef))


# ----------------------------------------------------------------------------- DPO family


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
    replaces the log-ratios in h by f'(u) (:func:`f_divergence_scores`, f-DPO).
    ``sft_weight`` > 0 adds RPO's NLL term (:func:`rpo_loss`), and then ``chosen_nll`` is
    required. Given token-AVERAGED log-probs this is TRL's ``sigmoid_norm`` (length-normalised
    DPO, Lambert et al. 2024, "Tulu 3", §5).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs of the chosen /
            rejected completion under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: > 0, the strength of the KL penalty (0.1 in the paper).
        label_smoothing: eps in [0, 0.5).
        f_divergence_type, f_alpha_divergence_coef: see :func:`f_divergence_scores`.
        chosen_nll: (B,) token-averaged NLL of the chosen completion, for ``sft_weight``.
        sft_weight: >= 0, RPO's alpha.

    Returns:
        losses (B,), chosen_rewards (B,) = beta * (policy_chosen - ref_chosen),
        rejected_rewards (B,) = beta * (policy_rejected - ref_rejected); rewards detached.
    """
    beta = _check_beta(beta)
    eps = _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * _score_margin(chosen_logratios, rejected_logratios, f_divergence_type,
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
    beta = _check_beta(beta)
    eps = float(label_smoothing)
    if not (0.0 <= eps < 0.5):
        raise ValueError(
            f"robust DPO needs label_smoothing (the flip rate eps) in [0, 0.5): its loss divides "
            f"by 1 - 2 eps, got {label_smoothing}"
        )
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * _score_margin(chosen_logratios, rejected_logratios, f_divergence_type,
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
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1 - beta * _score_margin(chosen_logratios, rejected_logratios, f_divergence_type,
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
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
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
    alpha = _check_non_negative(alpha, "alpha (sft_weight)")
    _check_shapes(dpo_losses=dpo_losses, chosen_nll=chosen_nll)
    return _fp32(dpo_losses) + alpha * _fp32(chosen_nll)


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
    beta = _check_beta(beta)
    eps = float(label_smoothing)
    if not (0.0 < eps < 1.0):
        raise ValueError(f"exo_pair needs label_smoothing (eps) in (0, 1): log eps is its target for the rejected "
                         f"side (the EXO paper uses 1e-3), got {label_smoothing}")
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * _score_margin(chosen_logratios, rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)  # (B,) each
    losses = (torch.exp(log_q_chosen) * (log_q_chosen - math.log1p(-eps))
              + torch.exp(log_q_rejected) * (log_q_rejected - math.log(eps)))
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


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

    Args: as :func:`dpo_loss` (beta only).
    Returns: as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(
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

    The paper's form with the running reward shift delta is the unpaired :func:`bco_loss`
    (``--loss bco``); TRL users rely on this one under this name.

    Args: as :func:`dpo_loss` (beta only).
    Returns: as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(
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

    Args: as :func:`dpo_loss` (beta only).
    Returns: as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


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

    Args: as :func:`dpo_loss`; ``label_smoothing`` = eps in [0, 0.5).
    Returns: losses (B,) in sorted order; rewards per pair as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    eps = _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    policy_margins = _fp32(policy_chosen_logps) - _fp32(policy_rejected_logps)  # (B,)
    ref_margins = _fp32(ref_chosen_logps) - _fp32(ref_rejected_logps)  # (B,)
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

    Args: as :func:`dpo_loss`; ``label_smoothing`` = eps in [0, 0.5).
    Returns: losses (B,) in sorted order; rewards per pair as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    eps = _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    losses = _sorted_logistic(delta, beta, eps)
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

    Args: as :func:`dpo_loss` (beta only).
    Returns: as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(
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

    Args: as :func:`dpo_loss` (beta only).
    Returns: as :func:`dpo_loss`.
    """
    beta = _check_beta(beta)
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards - chosen_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


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
    beta = _check_beta(beta)
    tau = _check_positive(tau, "tau (discopop_tau)")
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * _score_margin(chosen_logratios, rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    modulation = torch.sigmoid(logits / tau)  # (B,)
    losses = (1 - modulation) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / tau) - logits)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


# ----------------------------------------------------------------------------- reference-free


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
    lambda_ = _check_non_negative(lambda_, "lambda_ (orpo_lambda)")
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_nll=chosen_nll,
    )
    chosen_logps = _fp32(policy_chosen_logps)  # (B,)
    rejected_logps = _fp32(policy_rejected_logps)  # (B,)
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
    nll = _fp32(chosen_nll)
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
    beta = _check_beta(beta)
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma (simpo_gamma) must be finite, got {gamma}")
    sft_weight = _check_non_negative(sft_weight, "sft_weight")
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_rewards = beta * _fp32(policy_chosen_logps)  # (B,)
    rejected_rewards = beta * _fp32(policy_rejected_logps)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    if sft_weight > 0:
        if chosen_nll is None:
            raise ValueError("simpo_loss: sft_weight > 0 needs chosen_nll (the SFT term would be ignored)")
        _check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
        losses = losses + sft_weight * _fp32(chosen_nll)
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
    beta = _check_beta(beta)
    cpo_alpha = _check_non_negative(cpo_alpha, "cpo_alpha")
    eps = _check_label_smoothing(label_smoothing)
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma (simpo_gamma) must be finite, got {gamma}")
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nll = _fp32(torch.as_tensor(chosen_token_nll)).reshape(())
    chosen_rewards = beta * _fp32(policy_chosen_logps)  # (B,)
    rejected_rewards = beta * _fp32(policy_rejected_logps)  # (B,)
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits) + cpo_alpha * nll
    return losses, chosen_rewards.detach(), rejected_rewards.detach(), {"nll_loss": nll.detach()}


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
    _check_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen, rejected = _fp32(chosen_rewards), _fp32(rejected_rewards)
    delta = chosen - rejected
    if margins is not None:
        _check_shapes(chosen_rewards=chosen_rewards, margins=margins)
        delta = delta - _fp32(margins)
    losses = -F.logsigmoid(delta)
    if center_rewards_coefficient:
        _check_non_negative(center_rewards_coefficient, "center_rewards_coefficient")
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses, chosen.detach(), rejected.detach()


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
    _check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_counts=chosen_counts)
    loss = -_fp32(policy_chosen_logps).sum() / chosen_counts.sum().clamp(min=1)
    return loss.expand(policy_chosen_logps.shape[0])


# ----------------------------------------------------------------------------- KTO


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
    _check_shapes(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_kl_estimate needs at least one mismatched pair")
    mean = (_fp32(policy_kl_logps) - _fp32(ref_kl_logps)).mean().detach()
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
    beta = _check_beta(beta)
    desirable_weight = _check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = _check_positive(undesirable_weight, "undesirable_weight")
    _check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got dtype {labels.dtype}")
    logratios = _fp32(policy_logps) - _fp32(ref_logps)  # (B,) = r
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
    desirable_weight = _check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = _check_positive(undesirable_weight, "undesirable_weight")
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
    """APO-zero, unpaired: D'Oosterlinck et al. 2024 (see :func:`apo_zero_loss`), eq. 7 split per
    completion, as TRL's KTOConfig ``loss_type="apo_zero_unpaired"``. With r = policy - ref:

        desirable:   loss = w_D * (1 - sigmoid(beta * r))
        undesirable: loss = w_U * sigmoid(beta * r)

    KTO's loss without its KL reference point (no mismatched completions are needed).

    Args: as :func:`kto_loss`, without ``kl``.
    Returns: losses (B,), rewards (B,) = beta * r (detached), {}.
    """
    beta = _check_beta(beta)
    desirable_weight = _check_positive(desirable_weight, "desirable_weight")
    undesirable_weight = _check_positive(undesirable_weight, "undesirable_weight")
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
    beta = _check_beta(beta)
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


def _unpaired_logratios(policy_logps, ref_logps, labels) -> torch.Tensor:
    _check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got dtype {labels.dtype}")
    return _fp32(policy_logps) - _fp32(ref_logps)  # (B,)


# ----------------------------------------------------------------------------- log-prob modifiers


def length_desensitized_logps(
    token_logps: torch.Tensor, token_seq: torch.Tensor, num_groups: int, alpha: float
) -> torch.Tensor:
    """LD-DPO: Liu et al. 2024, "Length Desensitization in Directed Preference Optimization",
    eq. 9: a pair's log-probs count the tokens both completions have in full, and the longer
    one's extra tokens with weight alpha (a "public length" l_p = min(l_chosen, l_rejected)):

        logp~(y) = sum_{t <= l_p} log p(y_t) + alpha * sum_{t > l_p} log p(y_t)

    The same weighting is applied to policy and reference log-probs (as in the paper and TRL).
    alpha = 1 is plain summed log-probs; alpha = 0 drops the excess tokens.

    Args:
        token_logps: (N,) log-prob of every completion token of the batch, each sequence's
            tokens in their text order (the order :mod:`preftune.data.batch` lists them).
        token_seq: (N,) long, the sequence of each token; sequence s = k * G + g, so for pairs
            0..G-1 are the chosen and G..2G-1 the rejected completions.
        num_groups: G (the batch holds 2G sequences).
        alpha: in [0, 1].

    Returns:
        (2G,) float32 length-desensitised summed log-probs.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"ld_alpha must be in [0, 1] (1 = plain DPO), got {alpha}")
    _check_shapes(token_logps=token_logps, token_seq=token_seq)
    num_seqs = 2 * num_groups
    counts = torch.bincount(token_seq, minlength=num_seqs)  # (2G,)
    if counts.shape[0] != num_seqs:
        raise ValueError(f"length_desensitized_logps needs pairs: token_seq has ids >= 2 * num_groups ({num_seqs})")
    order = torch.argsort(token_seq, stable=True)  # (N,) tokens grouped by sequence, text order kept
    starts = torch.cumsum(counts, 0) - counts  # (2G,) first sorted position of each sequence
    position = torch.empty_like(token_seq)
    position[order] = torch.arange(token_seq.shape[0], device=token_seq.device) - starts[token_seq[order]]
    public = torch.minimum(counts[:num_groups], counts[num_groups:]).repeat(2)  # (2G,) l_p per sequence
    logps = _fp32(token_logps)
    weights = torch.where(position < public[token_seq], torch.ones_like(logps), torch.full_like(logps, alpha))
    return torch.zeros(num_seqs, dtype=logps.dtype, device=logps.device).index_add(0, token_seq, logps * weights)


def wpo_weights(
    token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, token_seq: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """WPO: Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    eq. 2 with the paper's sampled weight alignment: each pair's loss is weighted by how
    likely the policy is to produce both completions, per token and relative to its own
    expected token probability sum_v p(v)^2:

        w(y) = exp( 1/|y| sum_t [log p(y_t) - log sum_v p(v | y_<t)^2] )
        weight = w(chosen) * w(rejected)        (detached, as in the paper and TRL)

    Args:
        token_logps: (N,) policy log-prob of every completion token.
        token_log_sum_sq: (N,) log sum_v p(v)^2 of the policy's distribution at each token.
        token_seq: (N,) long sequence id (0..G-1 chosen, G..2G-1 rejected).
        num_groups: G.

    Returns:
        (G,) detached float32 weights, one per pair.
    """
    _check_shapes(token_logps=token_logps, token_log_sum_sq=token_log_sum_sq, token_seq=token_seq)
    num_seqs = 2 * num_groups
    aligned = (_fp32(token_logps) - _fp32(token_log_sum_sq)).detach()  # (N,)
    sums = torch.zeros(num_seqs, dtype=aligned.dtype, device=aligned.device).index_add(0, token_seq, aligned)
    counts = torch.bincount(token_seq, minlength=num_seqs).clamp(min=1)
    weights = torch.exp(sums / counts)  # (2G,)
    return weights[:num_groups] * weights[num_groups:]
