"""KTO, APO-zero unpaired and BCO (preftune.methods.losses.unpaired), worked out by hand."""

import pytest
import torch

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.unpaired import (
    apo_zero_unpaired_loss,
    bco_loss,
    bco_reward_shift,
    kto_kl_estimate,
    kto_loss,
    kto_weight_warning,
)


def test_kto_mixed_labels():
    """beta 1, z0 = 0.5, labels [desirable, undesirable, desirable],
    r = policy - ref = [-1 - -2, -3 - -2, -2 - -2] = [1, -1, 0]; w_D = 1, w_U = 2.
    row 0 (D): 1 * (1 - sigmoid(1 - 0.5)) = 1 - 0.622459 = 0.377541
    row 1 (U): 2 * (1 - sigmoid(0.5 - -1)) = 2 * (1 - 0.817574) = 2 * 0.182426 = 0.364851
    row 2 (D): 1 * (1 - sigmoid(0 - 0.5)) = 1 - 0.377541 = 0.622459
    rewards = beta * r = [1, -1, 0].
    """
    policy = t(-1.0, -3.0, -2.0).requires_grad_()
    losses, rewards, metrics = kto_loss(
        policy, t(-2.0, -2.0, -2.0), torch.tensor([True, False, True]), kl=torch.tensor(0.5),
        beta=1.0, desirable_weight=1.0, undesirable_weight=2.0,
    )
    assert_close(losses, [0.377541, 0.364851, 0.622459])
    assert_close(rewards, [1.0, -1.0, 0.0])
    assert_close(metrics["kl"], 0.5)
    assert not rewards.requires_grad
    losses.sum().backward()
    # desirable rows are pushed up (negative gradient), the undesirable row down
    assert policy.grad[0] < 0 and policy.grad[2] < 0 and policy.grad[1] > 0


def test_kto_clamps_negative_kl_and_detaches_it():
    """kl = -3 is clamped to 0: desirable r = 0 -> 1 - sigmoid(0) = 0.5."""
    kl = torch.tensor(-3.0, requires_grad=True)
    losses, _, metrics = kto_loss(t(-2.0), t(-2.0), torch.tensor([True]), kl=kl, beta=0.1)
    assert_close(losses, [0.5])
    assert_close(metrics["kl"], 0.0)
    assert not metrics["kl"].requires_grad


def test_kto_kl_estimate_mean_and_clamp():
    """[-1 - -2, -1 - -1.5] = [1, 0.5] -> mean 0.75.
    [-3 - -1, -2 - -1] = [-2, -1] -> mean -1.5 -> clamped to 0."""
    policy = t(-1.0, -1.0).requires_grad_()
    estimate = kto_kl_estimate(policy, t(-2.0, -1.5))
    assert estimate.shape == ()
    assert_close(estimate, 0.75)
    assert not estimate.requires_grad
    assert_close(kto_kl_estimate(t(-3.0, -2.0), t(-1.0, -1.0)), 0.0)
    assert_close(kto_kl_estimate(t(-3.0, -2.0), t(-1.0, -1.0), clamp=False), -1.5)  # to average across ranks


def test_kto_input_validation():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(-1.0), t(-1.0), torch.tensor([1]), kl=0.0, beta=0.1)
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(t(-1.0), t(-1.0), torch.tensor([True]), kl=t(0.1, 0.2), beta=0.1)


def test_kto_weight_warning():
    """ratio = (w_D n_D) / (w_U n_U), recommended in [1, 4/3]:
    (1 * 100) / (1 * 100) = 1 ok; (1 * 4) / (1 * 3) = 1.333 ok; (10 * 10) / (1 * 100) = 1 ok;
    (1 * 100) / (1 * 10) = 10 warn; (1 * 10) / (1 * 100) = 0.1 warn -> suggest w_D in [10, 13.3];
    one class missing warns.
    """
    assert kto_weight_warning(100, 100, 1.0, 1.0) is None
    assert kto_weight_warning(4, 3, 1.0, 1.0) is None
    assert kto_weight_warning(10, 100, 10.0, 1.0) is None
    assert "10" in kto_weight_warning(100, 10, 1.0, 1.0)
    message = kto_weight_warning(10, 100, 1.0, 1.0)
    assert "0.1" in message and "between 10 and 13.3" in message
    assert "undesirable" in kto_weight_warning(5, 0)


def test_apo_zero_unpaired_hand_computed():
    """beta 1, r = policy - ref = [-1 - -2, -1 - -2] = [1, 1], labels [desirable, undesirable]:
    desirable 1 - sigmoid(1) = 0.268941; undesirable sigmoid(1) = 0.731059, x w_U = 2 -> 1.462117."""
    labels = torch.tensor([True, False])
    losses, rewards, metrics = apo_zero_unpaired_loss(t(-1.0, -1.0), t(-2.0, -2.0), labels, beta=1.0)
    assert_close(losses, [0.268941, 0.731059])
    assert_close(rewards, [1.0, 1.0])
    assert metrics == {}
    weighted, _, _ = apo_zero_unpaired_loss(t(-1.0, -1.0), t(-2.0, -2.0), labels, beta=1.0, undesirable_weight=2.0)
    assert_close(weighted, [0.268941, 1.462117])


def test_bco_hand_computed():
    """beta 1, r = [-1 - -2, -3 - -2] = [1, -1], delta 0.5, labels [desirable, undesirable]:
    desirable -log sigmoid(1 - 0.5) = 0.474077; undesirable -log sigmoid(-(-1 - 0.5)) = -log sigmoid(1.5)
    = 0.201413. delta is detached and logged."""
    delta = torch.tensor(0.5, requires_grad=True)
    losses, rewards, metrics = bco_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), delta, beta=1.0)
    assert_close(losses, [0.474077, 0.201413])
    assert_close(rewards, [1.0, -1.0])
    assert_close(metrics["delta"], 0.5)
    assert not metrics["delta"].requires_grad


def test_bco_reward_shift_is_the_running_mean_of_batch_means():
    """Batch means 0.2, 0.8, 0.5: running means 0.2, (0.2 + 0.8) / 2 = 0.5, (0.2 + 0.8 + 0.5) / 3 = 0.5."""
    state = bco_reward_shift(t(0.2), None)
    assert state == (pytest.approx(0.2), 1)
    state = bco_reward_shift(t(0.8), state)
    assert state == (pytest.approx(0.5), 2)
    assert bco_reward_shift(t(0.5), state) == (pytest.approx(0.5), 3)
    with pytest.raises(ValueError, match="not finite"):
        bco_reward_shift(t(float("nan")), state)
