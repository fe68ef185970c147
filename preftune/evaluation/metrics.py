"""Small statistics for evaluation: win rates with a confidence interval, Monte-Carlo KL, how well
rewards rank a group's responses (ranking accuracy, Kendall's tau-b).

Pure functions of numbers; nothing here touches a model or a judge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

# Allowed per-item outcomes of a comparison: a wins, b wins, tie.
WIN, LOSS, TIE = 1.0, 0.0, 0.5


@dataclass(frozen=True)
class WinRate:
    """A win rate of "a" over "b" with its confidence interval [low, high].

    ``rate = (wins + 0.5 * ties) / n``: a tie counts as half a win for each side.
    """

    rate: float
    low: float
    high: float
    n: int
    wins: int
    losses: int
    ties: int

    def __str__(self) -> str:
        return (f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"(n={self.n}: {self.wins} wins, {self.losses} losses, {self.ties} ties)")


def win_rate(outcomes: Iterable[float], confidence: float = 0.95) -> WinRate:
    """Tie-split win rate with a Wilson score interval.

    Args:
        outcomes: one value per compared item: 1 (a wins), 0 (b wins) or 0.5 (tie).
        confidence: two-sided level of the interval (0.95 gives z = 1.95996).

    The interval is the Wilson score interval (Wilson 1927, "Probable inference, the law
    of succession, and statistical inference", JASA 22:209-212) applied to the tie-split
    rate p = (wins + ties / 2) / n. Brown, Cai & DasGupta 2001 ("Interval Estimation for
    a Binomial Proportion", Statistical Science 16:101-133) recommend it over the normal
    (Wald) interval because it keeps close to its nominal coverage at small n and never
    collapses to zero width or leaves [0, 1] when p is 0 or 1. With z the normal quantile:

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Ties are half a Bernoulli trial each, so the true variance of the tie-split rate is at
    most p(1 - p)/n: with ties the interval is, if anything, a little conservative.

    Raises ValueError on an empty input, an outcome outside {0, 0.5, 1} or a confidence
    outside (0, 1).
    """
    values = [float(v) for v in outcomes]
    if not values:
        raise ValueError("win_rate needs at least one outcome")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    bad = sorted({v for v in values if v not in (WIN, LOSS, TIE)})
    if bad:
        raise ValueError(f"outcomes must be 1 (a wins), 0 (b wins) or 0.5 (tie); got {bad[:5]}")
    wins = sum(v == WIN for v in values)
    losses = sum(v == LOSS for v in values)
    n = len(values)
    ties = n - wins - losses
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n, confidence)
    return WinRate(rate=rate, low=low, high=high, n=n, wins=wins, losses=losses, ties=ties)


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) for an observed proportion ``rate`` of ``n`` trials."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2_n = z * z / n
    denominator = 1.0 + z2_n
    centre = (rate + z2_n / 2) / denominator
    half = z / denominator * math.sqrt(rate * (1 - rate) / n + z2_n / (4 * n))
    # Clamp only float round-off: mathematically the interval lies inside [0, 1].
    return max(0.0, centre - half), min(1.0, centre + half)


def kl_from_samples(policy_logps: Sequence[float] | torch.Tensor,
                    base_logps: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Monte-Carlo KL(policy || base) from sequences sampled from the policy.

    KL(p || q) = E_{y ~ p(.|x)} [log p(y|x) - log q(y|x)], so with y_i sampled from the
    policy the mean of the per-sample differences is an unbiased estimate (Schulman's
    "k1" estimator). A single difference can be negative, and so can the mean of a few;
    it is reported as is, not clipped, so that the standard error stays honest.

    Args:
        policy_logps: (S,) summed log-probs of each sampled completion under the policy.
        base_logps: (S,) the same completions under the base (reference) model.

    Returns:
        ``(mean, stderr)`` in nats per sequence; stderr = sample std (ddof 1) / sqrt(S),
        NaN when S == 1.
    """
    policy = torch.as_tensor(policy_logps, dtype=torch.float64).detach().cpu().reshape(-1)
    base = torch.as_tensor(base_logps, dtype=torch.float64).detach().cpu().reshape(-1)
    if policy.shape != base.shape:
        raise ValueError(f"policy_logps and base_logps must have the same length, "
                         f"got {policy.numel()} and {base.numel()}")
    if policy.numel() == 0:
        raise ValueError("kl_from_samples needs at least one sample")
    differences = policy - base  # (S,)
    if not torch.isfinite(differences).all():
        raise ValueError("log-probs must be finite (a -inf log-prob means a sample the base model cannot produce)")
    mean = differences.mean().item()
    if differences.numel() < 2:
        return mean, float("nan")
    stderr = (differences.std(unbiased=True) / math.sqrt(differences.numel())).item()
    return mean, stderr


def ranking_metrics(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """How well implicit rewards order the responses of each group, against the labels' scores.

    Args:
        rewards: (G, K) one reward per response (the implicit reward ``beta * (log p - log p_base)``).
        scores: (G, K) the labels, higher = better (a pair is a group scored ``[1, 0]``).
        mask: (G, K) bool, False where a group has fewer than K responses (ignored); None = all.

    Returns a dict:

    * ``ranking_accuracy``: over every ordered pair of every group (two responses of one group whose
      scores differ; tied scores form no pair), the share whose rewards order them the same way
      (strictly: a reward tie counts as a disagreement, as pair accuracy does); None without pairs.
      For pairs this is the preference accuracy ``mean[r_chosen > r_rejected]``.
    * ``ordered_pairs``: that number of pairs.
    * ``kendall_tau``: Kendall's tau-b between rewards and scores within each group, averaged over the
      groups where it is defined. Per group, over its n(n-1)/2 unordered pairs of responses,
      ``tau_b = (concordant - discordant) / sqrt((n0 - ties_scores) * (n0 - ties_rewards))``; a group
      whose scores or rewards are all tied has no tau (0/0) and is left out. Rewards of different
      prompts are not comparable, so tau is never pooled across groups. None when no group has one.
      For a pair it is +1 or -1, so over pairs without reward ties it equals ``2 * accuracy - 1``.
    * ``tau_groups``: the number of groups averaged.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu()
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
    if rewards.dim() != 2 or rewards.shape != scores.shape or mask.shape != scores.shape:
        raise ValueError(f"rewards, scores and mask must be (G, K) of one shape, got {tuple(rewards.shape)}, "
                         f"{tuple(scores.shape)} and {tuple(mask.shape)}")
    k = scores.shape[1]
    both = mask[:, :, None] & mask[:, None, :] & torch.ones(k, k, dtype=torch.bool).triu(1)  # (G, K, K): i < j
    label_sign = torch.sign(scores[:, :, None] - scores[:, None, :]) * both  # (G, K, K)
    reward_sign = torch.sign(rewards[:, :, None] - rewards[:, None, :]) * both
    ordered = int((label_sign != 0).sum())
    agree = int((label_sign * reward_sign > 0).sum())
    n0 = both.sum(dim=(1, 2)).double()  # (G,) unordered pairs
    untied_labels = n0 - ((label_sign == 0) & both).sum(dim=(1, 2))
    untied_rewards = n0 - ((reward_sign == 0) & both).sum(dim=(1, 2))
    denominator = (untied_labels * untied_rewards).sqrt()
    defined = denominator > 0
    taus = (label_sign * reward_sign).sum(dim=(1, 2))[defined] / denominator[defined]
    return {"ranking_accuracy": agree / ordered if ordered else None, "ordered_pairs": ordered,
            "kendall_tau": float(taus.mean()) if taus.numel() else None, "tau_groups": int(taus.numel())}


def best_response_mean(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over groups of ``values`` (G, K) at each group's best response: the mean over the responses
    holding the group's top score (all of them when the top is tied, so the listing order never
    matters); padding (``mask`` False) left out. For pairs scored ``[1, 0]`` the mean over the chosen."""
    values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
    if values.shape != scores.shape or mask.shape != scores.shape or values.dim() != 2 or not len(values):
        raise ValueError(f"values, scores and mask must be (G, K) of one shape with G >= 1, got "
                         f"{tuple(values.shape)}, {tuple(scores.shape)} and {tuple(mask.shape)}")
    top = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (G, 1)
    best = mask & (scores == top)  # (G, K)
    return float(((values * best).sum(dim=1) / best.sum(dim=1)).mean())
