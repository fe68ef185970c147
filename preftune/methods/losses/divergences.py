"""f-DPO's implicit rewards: Wang et al. 2023, "Beyond Reverse KL": the losses of
:mod:`preftune.methods.losses.pairwise` that take ``f_divergence_type`` compare f'(pi / pi_ref)
of the chosen and the rejected completion instead of their log-ratios.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_finite

# f-divergences of f-DPO (Wang et al. 2023); see :func:`f_divergence_scores`.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


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
        coef = check_finite(f_alpha_divergence_coef, "f_alpha_divergence_coef")
        if abs(coef - 1.0) < 1e-6:  # the limit (u^0 - 1) / 0 -> log u
            return logratios
        return (torch.exp(((coef - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (coef - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence_type!r}")


def f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type, f_alpha_divergence_coef):
    """(B,) f'(u_chosen) - f'(u_rejected): the h of DPO, generalised by :func:`f_divergence_scores`."""
    return (f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
            - f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef))
