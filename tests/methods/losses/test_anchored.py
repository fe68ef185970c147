"""Pair losses scoring each completion on its own (preftune.methods.losses.anchored), worked out by hand."""

from methods.losses.helpers import PAIR, assert_close, t
from preftune.methods.losses.anchored import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss


def test_nca_pair_hand_computed():
    """beta 1: r_chosen = 2, r_rejected = 0.
    -log sigmoid(2) = 0.126928; -log sigmoid(-2) = 2.126928; -log sigmoid(0) = 0.693147
    loss = 0.126928 + 0.5 * 2.126928 + 0.5 * 0.693147 = 0.126928 + 1.063464 + 0.346574 = 1.536966
    """
    losses, chosen_rewards, rejected_rewards = nca_pair_loss(**PAIR, beta=1.0)
    assert_close(losses, [1.536966])
    assert_close(chosen_rewards, [2.0])
    assert_close(rejected_rewards, [0.0])


def test_bco_pair_hand_computed():
    """beta 1: -log sigmoid(2) - log sigmoid(-0) = 0.126928 + 0.693147 = 0.820075."""
    losses, _, _ = bco_pair_loss(**PAIR, beta=1.0)
    assert_close(losses, [0.820075])


def test_sppo_hard_hand_computed():
    """beta 0.5 -> 1 / (2 beta) = 1; log-ratios 2 and 0: (2 - 1)^2 + (0 + 1)^2 = 2."""
    losses, chosen_rewards, _ = sppo_hard_loss(**PAIR, beta=0.5)
    assert_close(losses, [2.0])
    assert_close(chosen_rewards, [1.0])


def test_apo_zero_and_apo_down_hand_computed():
    """APO-zero, beta 1, log-ratios 2 and 0: (1 - sigmoid(2)) + sigmoid(0) = 0.119203 + 0.5 = 0.619203.
    APO-down, log-ratios 2 (chosen -1 vs ref -3) and 1 (rejected -2 vs ref -3):
    sigmoid(2) + (1 - sigmoid(2 - 1)) = 0.880797 + 0.268941 = 1.149738.
    Its gradient on the chosen log-prob is sigmoid'(2) - sigmoid'(1) = 0.104994 - 0.196612 = -0.091618
    (the margin term wins: descent raises it); at log-ratios 0 and -2 it is sigmoid'(0) - sigmoid'(2)
    = 0.25 - 0.104994 = +0.145006: descent lowers the chosen log-prob, APO-down's purpose.
    """
    losses, _, _ = apo_zero_loss(**PAIR, beta=1.0)
    assert_close(losses, [0.619203])
    chosen = t(-1.0).requires_grad_()
    down, _, _ = apo_down_loss(chosen, t(-2.0), t(-3.0), t(-3.0), beta=1.0)
    assert_close(down, [1.149738])
    down.sum().backward()
    assert_close(chosen.grad, [-0.091618])
    chosen = t(-3.0).requires_grad_()
    apo_down_loss(chosen, t(-3.0), t(-3.0), t(-1.0), beta=1.0)[0].sum().backward()
    assert_close(chosen.grad, [0.145006])
