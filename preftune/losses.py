"""Preference losses: one pure function per method, on per-sequence log-probs.

Every function takes (B,) tensors of per-sequence log-probs (one value per completion)
and returns ``(losses, chosen_rewards, rejected_rewards)``, all (B,):

* ``losses`` is unreduced: the caller takes the mean (and averages across processes).
* rewards are detached; they are for logging only.

ORPO returns a 4th element (a dict of per-example metrics) and KTO returns
``(losses, rewards, metrics)``; see their docstrings. ``rpo_loss`` returns losses only.

Whether the log-probs are *summed* over the completion's tokens or *averaged* (divided
by the completion length) depends on the method: see :data:`AVERAGED_LOGPS`. Everything
is computed in float32 at least (fp16/bf16 inputs are upcast; float64 stays float64), and
the results come back in that dtype.

Nothing here touches a model, a device or global state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Every loss name the training loop may be asked for.
METHODS = frozenset({"dpo", "robust", "hinge", "ipo", "orpo", "simpo", "kto", "sft"})

# Methods that need no reference model (no reference log-probs are computed).
REFERENCE_FREE = frozenset({"orpo", "simpo", "sft"})

# Methods whose log-probs are token-AVERAGED (sum of token log-probs / completion length)
# rather than summed; the training loop must pass averaged log-probs to these.
AVERAGED_LOGPS = frozenset({"ipo", "orpo", "simpo"})

# Methods trained on (prompt, chosen, rejected) pairs. The others are KTO (unpaired
# completions with a desirable/undesirable label) and SFT (one completion).
PAIRED = frozenset({"dpo", "robust", "hinge", "ipo", "orpo", "simpo"})

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


# ----------------------------------------------------------------------------- DPO family


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

        loss = -log sigmoid(beta * h)

    ``label_smoothing`` = eps > 0 gives conservative DPO (cDPO; Mitchell 2023, "A note on
    DPO with noisy preferences and relationship to IPO"), which assumes each label is
    flipped with probability eps:

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs of the chosen /
            rejected completion under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: > 0, the strength of the KL penalty (0.1 in the paper).
        label_smoothing: eps in [0, 0.5).

    Returns:
        losses (B,), chosen_rewards (B,) = beta * (policy_chosen - ref_chosen),
        rejected_rewards (B,) = beta * (policy_rejected - ref_rejected); rewards detached.
    """
    beta = _check_beta(beta)
    eps = _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = _logratios(  # (B,) each
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,) = beta * h
    losses = -F.logsigmoid(logits)
    if eps > 0:
        losses = (1 - eps) * losses - eps * F.logsigmoid(-logits)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
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
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
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
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
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
    TRL do; "ipo" is in :data:`AVERAGED_LOGPS`. With summed log-probs the fixed target
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
