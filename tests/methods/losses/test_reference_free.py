"""ORPO, SimPO and CPO (preftune.methods.losses.reference_free), worked out by hand."""

import math

import pytest
import torch

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.reference_free import cpo_loss, orpo_loss, simpo_loss


def test_orpo_hand_computed():
    """Averaged log-probs: chosen log 0.5, rejected log 0.2.
    odds(chosen) = 0.5 / 0.5 = 1 -> log odds 0
    odds(rejected) = 0.2 / 0.8 = 0.25 -> log odds = log 0.25 = -1.386294
    log odds ratio = 0 - -1.386294 = 1.386294
    L_OR = -log sigmoid(1.386294) = log(1 + e^-1.386294) = log(1 + 0.25) = 0.223144
    chosen_nll = 0.693147 (= -log 0.5); lambda = 0.1
    loss = 0.693147 + 0.1 * 0.223144 = 0.715461
    rewards = 0.1 * log 0.5 = -0.0693147, 0.1 * log 0.2 = -0.160944
    """
    losses, chosen_rewards, rejected_rewards, metrics = orpo_loss(
        t(math.log(0.5)), t(math.log(0.2)), chosen_nll=t(0.693147), lambda_=0.1
    )
    assert_close(losses, [0.715461])
    assert_close(chosen_rewards, [-0.0693147])
    assert_close(rejected_rewards, [-0.160944])
    assert_close(metrics["log_odds_ratio"], [1.386294])
    assert_close(metrics["log_odds_chosen"], [0.0])
    assert_close(metrics["or_loss"], [0.223144])
    assert_close(metrics["nll_loss"], [0.693147])
    assert all(not value.requires_grad for value in metrics.values())


def test_orpo_stable_near_zero_and_very_negative():
    """logp = -1e-8: log(1 - e^-1e-8) = log(1e-8 - 5e-17) = -18.420681 -> log odds 18.420681
    (naive log1p(-exp(logp)) in fp32 gives log1p(-1) = -inf here).
    logp = -50: log(1 - e^-50) = -1.9e-22 ~ 0 -> log odds -50.
    Chosen -1e-8, rejected -50: log OR = 68.420681, L_OR = log(1 + e^-68.4) ~ 0.
    Swapped: log OR = -68.420681, L_OR = log(1 + e^68.420681) = 68.420681.
    """
    near_zero, very_negative = -1e-8, -50.0
    chosen = t(near_zero, very_negative).requires_grad_()
    rejected = t(very_negative, near_zero).requires_grad_()
    losses, _, _, metrics = orpo_loss(chosen, rejected, chosen_nll=t(0.0, 0.0), lambda_=1.0)
    assert torch.isfinite(losses).all()
    assert_close(metrics["log_odds_chosen"], [18.420681, -50.0], tol=1e-4)
    assert_close(metrics["log_odds_ratio"], [68.420681, -68.420681], tol=1e-4)
    assert_close(losses, [0.0, 68.420681], tol=1e-4)
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_orpo_logp_exactly_zero_is_finite():
    """P = 1 exactly: logp is clamped to -1e-12 inside log(1 - p):
    log odds = 0 - log(1e-12) = 27.631021 instead of +inf; gradients stay finite."""
    chosen = t(0.0).requires_grad_()
    losses, _, _, metrics = orpo_loss(chosen, t(-1.0), chosen_nll=t(0.0), lambda_=0.1)
    assert_close(metrics["log_odds_chosen"], [27.631021], tol=1e-4)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


def test_orpo_rejects_positive_logps():
    """An NLL (positive) passed instead of a log-prob must not be silently clamped."""
    with pytest.raises(ValueError, match="log-probs"):
        orpo_loss(t(0.7), t(-1.0), chosen_nll=t(0.7), lambda_=0.1)


def test_orpo_half_precision_inputs_computed_in_fp32():
    """fp16(-1e-3) = -0.0010004043579101562; in fp32:
    log odds = x - log(-expm1(x)) = -0.0010004 - log(0.00099990) = -0.0010004 + 6.907855 = 6.906851
    (in fp16, exp(x) rounds to 0.99902 and the log odds come out near 6.93).
    """
    for dtype in (torch.float16, torch.bfloat16):
        chosen = torch.tensor([-1e-3], dtype=torch.float16).to(dtype)
        losses, chosen_rewards, _, metrics = orpo_loss(
            chosen, t(-2.0, dtype=dtype), chosen_nll=t(0.001, dtype=dtype), lambda_=0.1
        )
        assert losses.dtype == torch.float32 and chosen_rewards.dtype == torch.float32
        expected = 6.906851 if dtype == torch.float16 else None
        if expected is not None:
            assert_close(metrics["log_odds_chosen"], [expected], tol=1e-4)
        reference, _, _, reference_metrics = orpo_loss(chosen.float(), t(-2.0), t(0.001).to(dtype).float(), 0.1)
        assert_close(losses, reference)
        assert_close(metrics["log_odds_chosen"], reference_metrics["log_odds_chosen"])


def test_simpo_hand_computed():
    """avg chosen -1, avg rejected -2, beta 2, gamma 1:
    2 * -1 - 2 * -2 - 1 = -2 + 4 - 1 = 1 -> -log sigmoid(1) = log(1 + e^-1) = log(1.367879) = 0.313262
    rewards: 2 * -1 = -2, 2 * -2 = -4.
    With sft_weight 0.5 and chosen_nll 1.0: 0.313262 + 0.5 = 0.813262.
    """
    losses, chosen_rewards, rejected_rewards = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0)
    assert_close(losses, [0.313262])
    assert_close(chosen_rewards, [-2.0])
    assert_close(rejected_rewards, [-4.0])
    with_sft, _, _ = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0, chosen_nll=t(1.0), sft_weight=0.5)
    assert_close(with_sft, [0.813262])


def test_simpo_sft_weight_without_nll_is_refused():
    with pytest.raises(ValueError, match="chosen_nll"):
        simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0, sft_weight=0.5)


def test_cpo_hand_computed():
    """CPO, summed log-probs -1 and -2, beta 0.1, cpo_alpha 1, NLL 0.5:
    -log sigmoid(0.1 * (-1 - -2)) + 0.5 = -log sigmoid(0.1) + 0.5 = 0.644397 + 0.5 = 1.144397
    CPO-SimPO (averaged -1, -2), beta 2, gamma 1, cpo_alpha 0.5: -log sigmoid(2 - 1) + 0.25
    = 0.313262 + 0.25 = 0.563262. Rewards beta * logp: -0.1, -0.2; metric nll_loss 0.5.
    """
    losses, chosen_rewards, rejected_rewards, metrics = cpo_loss(t(-1.0), t(-2.0), t(0.5), beta=0.1)
    assert_close(losses, [1.144397])
    assert_close(chosen_rewards, [-0.1])
    assert_close(rejected_rewards, [-0.2])
    assert_close(metrics["nll_loss"], 0.5)
    losses, _, _, _ = cpo_loss(t(-1.0), t(-2.0), t(0.5), beta=2.0, cpo_alpha=0.5, gamma=1.0)
    assert_close(losses, [0.563262])
