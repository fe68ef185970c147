"""Win rates with a Wilson interval, and the Monte-Carlo KL estimate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from preftune.evaluation.metrics import kl_from_samples, wilson_interval, win_rate


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
