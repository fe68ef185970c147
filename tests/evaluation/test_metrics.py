"""Win rates with a Wilson interval, the Monte-Carlo KL estimate, and how well rewards rank a group
(ranking accuracy, Kendall's tau-b, the best response's mean)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from preftune.evaluation.metrics import best_response_mean, kl_from_samples, ranking_metrics, wilson_interval, win_rate


def test_win_rate_eight_of_ten():
    """8 wins, 2 losses, n = 10, p = 0.8, z = 1.959964 (95%), z^2 = 3.841459, z^2/n = 0.384146.

    centre = (0.8 + 0.384146 / 2) / 1.384146 = 0.992073 / 1.384146 = 0.716740
    half   = 1.959964 / 1.384146 * sqrt(0.8 * 0.2 / 10 + 3.841459 / 400)
           = 1.416010 * sqrt(0.016 + 0.009604) = 1.416010 * 0.160011 = 0.226578
    -> [0.490162, 0.943318] (the textbook Wilson interval for 8/10: [0.490, 0.943]).
    """
    result = win_rate([1.0] * 8 + [0.0] * 2)
    assert (result.n, result.wins, result.losses, result.ties) == (10, 8, 2, 0)
    assert result.rate == pytest.approx(0.8)
    assert result.low == pytest.approx(0.490162, abs=1e-5)
    assert result.high == pytest.approx(0.943318, abs=1e-5)


def test_win_rate_all_wins_keeps_a_width():
    """10 of 10: p = 1, so the p(1-p)/n term vanishes.

    centre = (1 + 0.192073) / 1.384146 = 0.861234,  half = 1.416010 * sqrt(0.009604) = 0.138766
    -> [0.722467, 1.0]: not the zero-width [1, 1] the normal (Wald) interval would give.
    """
    result = win_rate([1] * 10)
    assert result.rate == 1.0
    assert result.low == pytest.approx(0.722467, abs=1e-5)
    assert result.high == pytest.approx(1.0)
    lost = win_rate([0] * 10)
    assert (lost.low, lost.high) == pytest.approx((0.0, 1 - 0.722467), abs=1e-5)


def test_ties_count_half():
    """3 wins and 1 tie out of 4: rate = (3 + 0.5) / 4 = 0.875."""
    result = win_rate([1, 1, 1, 0.5])
    assert (result.rate, result.wins, result.ties, result.losses) == (0.875, 3, 1, 0)
    assert result.low < 0.875 < result.high


def test_bad_outcomes_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        win_rate([])
    with pytest.raises(ValueError, match="1 \\(a wins\\)"):
        win_rate([1, 0.3])
    with pytest.raises(ValueError, match="confidence"):
        win_rate([1], confidence=1.0)


@given(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=60))
def test_interval_contains_the_rate(outcomes):
    result = win_rate(outcomes)
    assert 0.0 <= result.low <= result.rate <= result.high <= 1.0
    assert result.wins + result.losses + result.ties == result.n


def test_wider_confidence_is_wider():
    narrow, wide = wilson_interval(0.6, 20, 0.8), wilson_interval(0.6, 20, 0.99)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_kl_from_samples_by_hand():
    """Differences log p - log q = [1, 0, 2]: mean 1, sample std 1, stderr 1/sqrt(3) = 0.577350."""
    mean, stderr = kl_from_samples(torch.tensor([-1.0, -2.0, -3.0]), [-2.0, -2.0, -5.0])
    assert mean == pytest.approx(1.0)
    assert stderr == pytest.approx(0.577350, abs=1e-6)


def test_kl_from_samples_edges():
    assert kl_from_samples([-3.0, -4.0], [-3.0, -4.0]) == (0.0, 0.0)
    mean, stderr = kl_from_samples([-1.0], [-1.5])
    assert mean == 0.5 and math.isnan(stderr)
    with pytest.raises(ValueError, match="same length"):
        kl_from_samples([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="finite"):
        kl_from_samples([-1.0], [float("-inf")])


def test_ranking_metrics_by_hand():
    """Group 1: rewards [.3, .1, .2, -.5], scores [3, 2, 2, 0]. Of its 6 unordered pairs, (1, 2) is tied in
    the scores; the other 5 are ordered pairs and the rewards agree with all 5: concordant 5, discordant 0,
    tau-b = 5 / sqrt((6 - 1) * (6 - 0)) = 0.912871.
    Group 2: rewards [1, 1, 0, 0], scores [2, 1, 1, 0]. (1, 2) is tied in the scores; of the 5 ordered pairs
    (0, 1) and (2, 3) are tied in the rewards (disagreements for the accuracy, neither concordant nor
    discordant for tau), (0, 2), (0, 3), (1, 3) agree: tau-b = 3 / sqrt((6 - 1) * (6 - 2)) = 0.670820.
    Ranking accuracy pools the ordered pairs: (5 + 3) / 10 = 0.8; tau is the mean of the groups' taus."""
    rewards = torch.tensor([[0.3, 0.1, 0.2, -0.5], [1.0, 1.0, 0.0, 0.0]])
    scores = torch.tensor([[3.0, 2.0, 2.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    out = ranking_metrics(rewards, scores)
    assert out["ordered_pairs"] == 10 and out["ranking_accuracy"] == pytest.approx(0.8)
    assert out["tau_groups"] == 2
    assert out["kendall_tau"] == pytest.approx((5 / math.sqrt(30) + 3 / math.sqrt(20)) / 2, abs=1e-12)
    assert out["kendall_tau"] == pytest.approx((0.912871 + 0.670820) / 2, abs=1e-6)
    # a reversed ranking: every ordered pair disagrees, tau is the negation
    flipped = ranking_metrics(-rewards, scores)
    assert flipped["ranking_accuracy"] == 0.0  # group 2's reward ties are disagreements either way
    assert flipped["kendall_tau"] == pytest.approx(-out["kendall_tau"], abs=1e-12)


def test_ranking_metrics_of_pairs_are_the_preference_accuracy():
    """A pair is a group scored [1, 0]: its ranking accuracy is mean[r_chosen > r_rejected] and its tau-b
    is +1 or -1 (0/0 when its rewards tie: left out of the mean)."""
    rewards = torch.tensor([[0.5, 0.1], [0.2, 0.4], [1.0, -1.0], [0.3, 0.3]])
    out = ranking_metrics(rewards, torch.tensor([[1.0, 0.0]]).expand(4, 2))
    assert out["ranking_accuracy"] == pytest.approx(2 / 4) and out["ordered_pairs"] == 4
    assert out["tau_groups"] == 3 and out["kendall_tau"] == pytest.approx((1 - 1 + 1) / 3)
    untied = ranking_metrics(rewards[:3], torch.tensor([[1.0, 0.0]]).expand(3, 2))
    assert untied["kendall_tau"] == pytest.approx(2 * untied["ranking_accuracy"] - 1)


def test_ranking_metrics_padding_and_ties():
    """Padding (mask False) takes no part, whatever its values; an all-tied group has no ordered pair and
    no tau; with no pair at all both are None."""
    rewards = torch.tensor([[0.1, 0.5, 9.0], [0.2, 0.1, -9.0]])
    scores = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = ranking_metrics(rewards, scores, mask)
    assert (out["ranking_accuracy"], out["ordered_pairs"], out["kendall_tau"], out["tau_groups"]) == (1.0, 2, 1.0, 2)
    tied = ranking_metrics(torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]), torch.tensor([[1.0, 1.0, 1.0],
                                                                                        [3.0, 2.0, 1.0]]))
    assert (tied["ordered_pairs"], tied["ranking_accuracy"]) == (3, 1.0)
    assert (tied["kendall_tau"], tied["tau_groups"]) == (1.0, 1)
    none = ranking_metrics(torch.tensor([[0.1, 0.2]]), torch.tensor([[1.0, 1.0]]))
    assert none == {"ranking_accuracy": None, "ordered_pairs": 0, "kendall_tau": None, "tau_groups": 0}
    with pytest.raises(ValueError, match="one shape"):
        ranking_metrics(torch.zeros(2, 3), torch.zeros(2, 2))


def test_best_response_mean():
    """Group 1's top score 3 is held by responses 0 and 2 (mean of 1.0 and 3.0 = 2.0); group 2's by response 1
    (-4.0), its padding (score 9) left out: (2.0 - 4.0) / 2 = -1.0."""
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, -4.0, 7.0]])
    scores = torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert best_response_mean(values, scores, mask) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one shape"):
        best_response_mean(values, scores[:, :2])
