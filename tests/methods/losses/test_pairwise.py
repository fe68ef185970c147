"""DPO and the losses of its margin (preftune.methods.losses.pairwise), against numbers worked out by hand."""

import pytest

from methods.losses.helpers import PAIR, assert_close, t
from preftune.methods.losses.pairwise import (
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    rpo_loss,
)


def test_dpo_hand_computed():
    """h = 2; beta = 0.1 -> beta h = 0.2
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.818731) = log(1.818731) = 0.598139
    chosen reward = 0.1 * (-1 - -3) = 0.2; rejected reward = 0.1 * (-2 - -2) = 0.
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIR, beta=0.1)
    assert losses.shape == (1,)
    assert_close(losses, [0.598139])
    assert_close(chosen_rewards, [0.2])
    assert_close(rejected_rewards, [0.0])


def test_dpo_policy_equals_reference_gives_log2_and_zero_rewards():
    """policy == ref -> h = 0 -> -log sigmoid(0) = log 2 = 0.693147 for any beta; rewards 0."""
    logps = t(-5.0, -12.5, -0.3)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.5)
    assert_close(losses, [0.693147] * 3)
    assert_close(chosen_rewards, [0.0] * 3)
    assert_close(rejected_rewards, [0.0] * 3)


def test_dpo_label_smoothing_acts():
    """cDPO, eps = 0.1, beta h = 0.2:
    -log sigmoid(0.2) = 0.598139, -log sigmoid(-0.2) = 0.598139 + 0.2 = 0.798139
    loss = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814 = 0.618139
    (!= 0.598139: the flag must not be silently ignored.)
    """
    losses, _, _ = dpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    assert_close(losses, [0.618139])
    plain, _, _ = dpo_loss(**PAIR, beta=0.1)
    assert abs(losses.item() - plain.item()) > 0.01


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    """d loss / d policy_chosen = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2)
    = -0.1 * 0.450166 = -0.0450166; d loss / d policy_rejected = +0.0450166.
    Gradient descent therefore raises the chosen log-prob and lowers the rejected one.
    """
    policy_chosen = t(-1.0).requires_grad_()
    policy_rejected = t(-2.0).requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, t(-3.0), t(-2.0), beta=0.1)
    losses.mean().backward()
    assert_close(policy_chosen.grad, [-0.0450166])
    assert_close(policy_rejected.grad, [0.0450166])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_batch_is_unreduced():
    """Row 0: h = 2 -> 0.598139 (above). Row 1: h = -2 -> -log sigmoid(-0.2) = 0.798139."""
    losses, _, _ = dpo_loss(t(-1.0, -3.0), t(-2.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), beta=0.1)
    assert_close(losses, [0.598139, 0.798139])


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.9])
def test_dpo_label_smoothing_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**PAIR, beta=0.1, label_smoothing=eps)


def test_dpo_under_f_divergences_hand_computed():
    """PAIR: log-ratios 2 (chosen) and 0 (rejected), beta 0.1; h = f'(e^2) - f'(e^0):
    forward_kl: h = 0.864665 - 0 -> -log sigmoid(0.0864665) = log(1 + 0.917165) = 0.650848
    js: h = 0.566219 - (log 2 + log sigmoid(0) = 0) -> log(1 + e^-0.0566219) = log(1.944951) = 0.665237
    alpha 0.5: h = 1.264241 - 0 -> log(1 + e^-0.1264241) = log(1.881245) = 0.631932
    Rewards stay beta * log-ratio: 0.2 and 0.
    """
    for kind, expected in (("forward_kl", 0.650848), ("js_divergence", 0.665237), ("alpha_divergence", 0.631932)):
        losses, chosen_rewards, rejected_rewards = dpo_loss(**PAIR, beta=0.1, f_divergence_type=kind,
                                                            f_alpha_divergence_coef=0.5)
        assert_close(losses, [expected])
        assert_close(chosen_rewards, [0.2])
        assert_close(rejected_rewards, [0.0])


def test_dpo_with_sft_weight_is_rpo():
    """0.598139 + 1.0 * 1.5 = 2.098139 (the RPO term inside dpo_loss); without chosen_nll it is refused."""
    losses, _, _ = dpo_loss(**PAIR, beta=0.1, chosen_nll=t(1.5), sft_weight=1.0)
    assert_close(losses, [2.098139])
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(**PAIR, beta=0.1, sft_weight=1.0)


def test_robust_dpo_hand_computed():
    """eps = 0.1, beta h = 0.2:
    (0.9 * 0.598139 - 0.1 * 0.798139) / (1 - 0.2) = (0.538325 - 0.079814) / 0.8
    = 0.458511 / 0.8 = 0.573139
    """
    losses, chosen_rewards, _ = robust_dpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    assert_close(losses, [0.573139])
    assert_close(chosen_rewards, [0.2])


def test_robust_dpo_with_zero_eps_is_dpo():
    """eps = 0 -> (1 * 0.598139 + 0) / 1 = 0.598139, the plain DPO value."""
    losses, _, _ = robust_dpo_loss(**PAIR, beta=0.1, label_smoothing=0.0)
    assert_close(losses, [0.598139])


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_dpo_rejects_eps_at_or_above_half(eps):
    with pytest.raises(ValueError, match="1 - 2 eps"):
        robust_dpo_loss(**PAIR, beta=0.1, label_smoothing=eps)


def test_hinge_hand_computed():
    """beta = 0.1. Row 0: h = 2 -> relu(1 - 0.2) = 0.8.
    Row 1: policy chosen -1, ref chosen -21, rejected equal -> h = 20 -> relu(1 - 2) = 0.
    """
    losses, chosen_rewards, _ = hinge_loss(t(-1.0, -1.0), t(-2.0, -2.0), t(-3.0, -21.0), t(-2.0, -2.0), beta=0.1)
    assert_close(losses, [0.8, 0.0])
    assert_close(chosen_rewards, [0.2, 2.0])


def test_ipo_hand_computed():
    """Averaged log-probs; beta = 0.1 -> target 1 / (2 * 0.1) = 5.
    Row 0: h = (-0.5 - -1.5) - (-2.0 - -1.0) = 1 + 1 = 2 -> (2 - 5)^2 = 9.
    Row 1: h = (-0.5 - -3.5) - (-2.0 - 0.0) = 3 + 2 = 5 -> (5 - 5)^2 = 0.
    """
    losses, chosen_rewards, rejected_rewards = ipo_loss(
        t(-0.5, -0.5), t(-2.0, -2.0), t(-1.5, -3.5), t(-1.0, 0.0), beta=0.1
    )
    assert_close(losses, [9.0, 0.0], tol=1e-5)
    assert_close(chosen_rewards, [0.1, 0.3])
    assert_close(rejected_rewards, [-0.1, -0.2])


def test_rpo_adds_weighted_nll():
    """0.598139 + 1.0 * 1.5 = 2.098139; alpha = 0 leaves 0.598139."""
    dpo_losses, _, _ = dpo_loss(**PAIR, beta=0.1)
    assert_close(rpo_loss(dpo_losses, t(1.5), alpha=1.0), [2.098139])
    assert_close(rpo_loss(dpo_losses, t(1.5), alpha=0.0), [0.598139])
    with pytest.raises(ValueError, match="alpha"):
        rpo_loss(dpo_losses, t(1.5), alpha=-1.0)


def test_exo_pair_hand_computed():
    """beta 0.1, eps 0.1, beta h = 0.2: q = sigmoid(0.2) = 0.549834, 1 - q = 0.450166
    log q = -0.598139, log(1 - q) = -0.798139, log 0.9 = -0.105361, log 0.1 = -2.302585
    loss = 0.549834 * (-0.598139 + 0.105361) + 0.450166 * (-0.798139 + 2.302585)
         = 0.549834 * -0.492778 + 0.450166 * 1.504446 = -0.270946 + 0.677250 = 0.406304
    eps = 0 is refused (log 0).
    """
    losses, chosen_rewards, _ = exo_pair_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    assert_close(losses, [0.406304])
    assert_close(chosen_rewards, [0.2])
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(**PAIR, beta=0.1, label_smoothing=0.0)


def test_discopop_hand_computed_and_finite_for_large_negative_margins():
    """beta 1, h = 2 -> x = 2.
    tau 1: m = sigmoid(2) = 0.880797; loss = 0.119203 * 0.126928 + 0.880797 * e^-2
         = 0.015130 + 0.880797 * 0.135335 = 0.015130 + 0.119203 = 0.134333
    tau 0.05: m = sigmoid(40) = 1 - 4e-18 -> loss = e^-2 = 0.135335.
    x = -200: m = sigmoid(-4000) = 0 and exp(200) overflows float32 (0 * inf = NaN in the naive form);
    here loss = -log sigmoid(-200) = 200, gradient -1.
    """
    losses, _, _ = discopop_loss(**PAIR, beta=1.0, tau=1.0)
    assert_close(losses, [0.134333])
    losses, _, _ = discopop_loss(**PAIR, beta=1.0)
    assert_close(losses, [0.135335])
    chosen = t(-200.0).requires_grad_()
    losses, _, _ = discopop_loss(chosen, t(0.0), t(0.0), t(0.0), beta=1.0)
    losses.sum().backward()
    assert_close(losses, [200.0], tol=1e-4)
    assert_close(chosen.grad, [-1.0])
