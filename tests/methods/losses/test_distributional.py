"""AOT (preftune.methods.losses.distributional), worked out by hand."""

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.distributional import aot_loss, aot_unpaired_loss

AOT_BATCH = dict(policy_chosen_logps=t(-1.0, -3.0), policy_rejected_logps=t(-2.0, -1.0),
                 ref_chosen_logps=t(-3.0, -2.0), ref_rejected_logps=t(-2.0, -1.0))


def test_aot_hand_computed():
    """Two pairs, beta 1, eps 0. Policy margins chosen - rejected: [-1 - -2, -3 - -1] = [1, -2] -> sorted
    [-2, 1]; reference margins [-3 - -2, -2 - -1] = [-1, -1] -> sorted [-1, -1]; delta = [-1, 2]:
    losses = [-log sigmoid(-1), -log sigmoid(2)] = [1.313262, 0.126928] (by rank, not by pair).
    Rewards per pair: beta * (policy - ref) chosen [2, -1], rejected [0, 0].
    """
    losses, chosen_rewards, rejected_rewards = aot_loss(**AOT_BATCH, beta=1.0)
    assert_close(losses, [1.313262, 0.126928])
    assert_close(chosen_rewards, [2.0, -1.0])
    assert_close(rejected_rewards, [0.0, 0.0])
    smoothed, _, _ = aot_loss(**AOT_BATCH, beta=1.0, label_smoothing=0.1)
    # eps 0.1: 0.9 * 1.313262 + 0.1 * -log sigmoid(1) = 1.181936 + 0.031326 = 1.213262;
    #          0.9 * 0.126928 + 0.1 * -log sigmoid(-2) = 0.114235 + 0.212693 = 0.326928
    assert_close(smoothed, [1.213262, 0.326928])


def test_aot_unpaired_hand_computed():
    """Chosen log-ratios [-1 - -3, -3 - -2] = [2, -1] -> sorted [-1, 2]; rejected [0, 0] -> [0, 0];
    delta = [-1, 2] -> losses [-log sigmoid(-1), -log sigmoid(2)] = [1.313262, 0.126928]."""
    losses, _, _ = aot_unpaired_loss(**AOT_BATCH, beta=1.0)
    assert_close(losses, [1.313262, 0.126928])
