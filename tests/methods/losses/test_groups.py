"""Losses on response groups (preftune.methods.losses.groups) and DPO-Positive, against numbers worked out by
hand or with plain Python math (never by calling the function under test twice).

Notation: r_i = beta * (policy_i - reference_i); -log sigmoid(x) = log(1 + e^-x).
"""

import math

import pytest
import torch

from methods.losses.helpers import PAIR, assert_close, t
from preftune.methods.losses.groups import (
    lipo_lambda_loss,
    ordered_pairs,
    pairwise_group_loss,
    plackett_luce_loss,
)
from preftune.methods.losses.pairwise import dpo_loss, dpop_loss


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), plain Python."""
    return math.log1p(math.exp(x))


# Group 0: four responses, scores 3, 1, 1, 2 (a tie at 1). Group 1: three responses and one padding slot,
# scores 5, 5, 0 (a tie at the top); the padding's score 9 must be ignored.
SCORES = torch.tensor([[3.0, 1.0, 1.0, 2.0], [5.0, 5.0, 0.0, 9.0]])
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])


@pytest.mark.parametrize("mode, expected", [
    ("all", [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 3, 1), (0, 3, 2), (1, 0, 2), (1, 1, 2)]),
    ("best-vs-rest", [(0, 0, 1), (0, 0, 2), (0, 0, 3), (1, 0, 2), (1, 1, 2)]),
    ("best-vs-worst", [(0, 0, 1), (0, 0, 2), (1, 0, 2), (1, 1, 2)]),
])
def test_ordered_pairs_skip_ties_and_padding(mode, expected):
    """(group, better, worse): ties (responses 1 and 2 of group 0; 0 and 1 of group 1) form no pair, every
    response tied at the top (bottom) takes part, the padding slot none."""
    pairs = ordered_pairs(SCORES, MASK, mode)
    assert list(zip(pairs.group.tolist(), pairs.better.tolist(), pairs.worse.tolist())) == expected


def test_ordered_pairs_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="group_pairs must be one of all, best-vs-rest, best-vs-worst"):
        ordered_pairs(SCORES, MASK, "random")


def test_all_pairs_dpo_over_groups_equals_the_mean_dpo_loss_of_the_expanded_pairs():
    """Groups of different size (4 responses with a tie, 3 with a tie, 2): the pairwise loss over the groups'
    ordered pairs, averaged over the batch, is the mean of DPO on each expanded pair alone, within 1e-6 (each
    group weighs as many pairs as it holds: 5 + 2 + 1 = 8)."""
    generator = torch.Generator().manual_seed(0)
    policy = -10 * torch.rand(3, 4, generator=generator, dtype=torch.float64)
    reference = -10 * torch.rand(3, 4, generator=generator, dtype=torch.float64)
    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0], [5.0, 5.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    losses, chosen_rewards, _ = pairwise_group_loss(dpo_loss, policy, reference, scores, mask, beta=0.1)
    expanded = []
    for g in range(3):
        k = int(mask[g].sum())
        for i in range(k):
            for j in range(k):
                if scores[g, i] > scores[g, j]:
                    h = (policy[g, i] - reference[g, i]) - (policy[g, j] - reference[g, j])
                    expanded.append(softplus(-0.1 * float(h)))
    assert len(expanded) == 8 and losses.shape == chosen_rewards.shape == (8,)
    assert abs(losses.mean().item() - sum(expanded) / len(expanded)) < 1e-6


def test_pairwise_group_loss_takes_any_pair_loss_and_per_response_inputs():
    """RPO (dpo with sft_weight 1) on one group of two, scores 0 and 1 (so response 1 is chosen): policy
    -2, -1; reference -2, -3 -> h = (-1 - -3) - (-2 - -2) = 2, DPO 0.598139; chosen NLL 0.5 -> 1.098139."""
    policy, reference = t(-2.0, -1.0)[None], t(-2.0, -3.0)[None]
    scores, mask = t(0.0, 1.0)[None], torch.ones(1, 2, dtype=torch.bool)
    nll = t(0.7, 0.5)[None]
    losses, _, _ = pairwise_group_loss(dpo_loss, policy, reference, scores, mask, beta=0.1, sft_weight=1.0,
                                       per_response={"chosen_nll": nll})
    assert_close(losses, [1.098139])


def test_plackett_luce_hand_computed():
    """beta 1, reference 0, policy 1, 0, 0.5, scores 2, 0, 1: the ranking is 0 > 2 > 1, r = 1, 0, 0.5.
    loss = [log(e^1 + e^0.5 + e^0) - 1] + [log(e^0.5 + e^0) - 0.5] + 0
         = [log(2.718282 + 1.648721 + 1) - 1] + [log(2.648721) - 0.5]
         = [1.680283 - 1] + [0.974077 - 0.5] = 0.680283 + 0.474077 = 1.154360"""
    expected = (math.log(math.e + math.exp(0.5) + 1) - 1) + (math.log(math.exp(0.5) + 1) - 0.5)
    losses, rewards = plackett_luce_loss(t(1.0, 0.0, 0.5)[None], torch.zeros(1, 3), t(2.0, 0.0, 1.0)[None],
                                         torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    assert_close(losses, [expected])
    assert_close(losses, [1.154347], tol=1e-5)
    assert_close(rewards, [[1.0, 0.0, 0.5]])
    assert not rewards.requires_grad


def test_plackett_luce_of_two_is_dpo():
    """A group of two: -log e^r_w / (e^r_w + e^r_l) = -log sigmoid(r_w - r_l): DPO's 0.598139 on PAIR."""
    policy = torch.stack([PAIR["policy_chosen_logps"], PAIR["policy_rejected_logps"]], dim=1)  # [1, 2]
    reference = torch.stack([PAIR["ref_chosen_logps"], PAIR["ref_rejected_logps"]], dim=1)
    losses, _ = plackett_luce_loss(policy, reference, t(1.0, 0.0)[None], torch.ones(1, 2, dtype=torch.bool),
                                   beta=0.1)
    assert_close(losses, [0.598139])


def test_plackett_luce_ties_carry_no_order():
    """Scores 1, 1, 0 (0 and 1 tied), r = 1, 0, 0.5 (beta 1): each tied response competes with response 2 only,
    loss = [log(e^1 + e^0.5) - 1] + [log(e^0 + e^0.5) - 0] = 0.474077 + 0.974077 = 1.448154;
    listing the responses in another order gives the same loss; an all-tied group gives 0."""
    expected = (math.log(math.e + math.exp(0.5)) - 1) + math.log(1 + math.exp(0.5))
    mask = torch.ones(1, 3, dtype=torch.bool)
    losses, _ = plackett_luce_loss(t(1.0, 0.0, 0.5)[None], torch.zeros(1, 3), t(1.0, 1.0, 0.0)[None], mask, beta=1.0)
    assert_close(losses, [expected])
    swapped, _ = plackett_luce_loss(t(0.0, 1.0, 0.5)[None], torch.zeros(1, 3), t(1.0, 1.0, 0.0)[None], mask, beta=1.0)
    assert_close(swapped, [expected])
    policy = t(1.0, 0.0, 0.5)[None].requires_grad_()
    tied, _ = plackett_luce_loss(policy, torch.zeros(1, 3), t(2.0, 2.0, 2.0)[None], mask, beta=1.0)
    tied.sum().backward()
    assert_close(tied, [0.0])
    assert_close(policy.grad, [[0.0, 0.0, 0.0]])


def test_plackett_luce_ignores_padding():
    """The hand-computed group with a fourth, padded response of any value: the same 1.154347."""
    mask = torch.tensor([[True, True, True, False]])
    losses, rewards = plackett_luce_loss(t(1.0, 0.0, 0.5, 7.0)[None], torch.zeros(1, 4), t(2.0, 0.0, 1.0, 9.0)[None],
                                         mask, beta=1.0)
    assert_close(losses, [1.154347], tol=1e-5)
    assert rewards[0, 3].item() == 0.0


def test_lipo_lambda_hand_computed():
    """beta 1, reference 0, s = policy = 0.5, 1.0, 0.0; scores psi = 2, 0, 1.
    Ranks by s (descending): response 1 first, 0 second, 2 third -> discounts 1/log2(1 + rank):
    1/log2(3) = 0.630930, 1/log2(2) = 1, 1/log2(4) = 0.5. Gains 2^psi - 1 = 3, 0, 1.
    Pairs psi_i > psi_j, Delta_ij = |G_i - G_j| |1/D_i - 1/D_j|, loss term log(1 + e^-(s_i - s_j)):
      (0, 1): 3 x 0.369070 = 1.107211, log(1 + e^0.5) = 0.974077 -> 1.078508
      (0, 2): 2 x 0.130930 = 0.261860, log(1 + e^-0.5) = 0.474077 -> 0.124142
      (2, 1): 1 x 0.5      = 0.5,      log(1 + e^1)    = 1.313262 -> 0.656631
    loss = 1.859281"""
    d = [1 / math.log2(3), 1.0, 0.5]
    gains = [3.0, 0.0, 1.0]
    s = [0.5, 1.0, 0.0]
    expected = sum(abs(gains[i] - gains[j]) * abs(d[i] - d[j]) * softplus(-(s[i] - s[j]))
                   for i, j in [(0, 1), (0, 2), (2, 1)])
    losses, rewards = lipo_lambda_loss(t(0.5, 1.0, 0.0)[None], torch.zeros(1, 3), t(2.0, 0.0, 1.0)[None],
                                       torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    assert_close(losses, [expected])
    assert_close(losses, [1.859281], tol=1e-5)
    assert_close(rewards, [[0.5, 1.0, 0.0]])


def test_lipo_lambda_weights_carry_no_gradient_and_ties_no_pair():
    """Scores 1, 0, 0: pairs (0, 1) and (0, 2), the tie (1, 2) none. s = 0, 0, 0 (policy == reference) ranks
    the responses in list order: discounts 1, 0.630930, 0.5; gains 1, 0, 0: Delta_01 = 0.369070,
    Delta_02 = 0.5; loss = 0.869070 x log 2 = 0.602396. The weights are constants: d loss / d s_0 =
    -(Delta_01 + Delta_02) sigmoid(0) = -0.434535, d/d s_1 = 0.184535, d/d s_2 = 0.25."""
    policy = torch.zeros(1, 3, requires_grad=True)
    losses, _ = lipo_lambda_loss(policy, torch.zeros(1, 3), t(1.0, 0.0, 0.0)[None],
                                 torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    losses.sum().backward()
    d01, d02 = 1 - 1 / math.log2(3), 0.5
    assert_close(losses, [(d01 + d02) * math.log(2)])
    assert_close(policy.grad, [[-(d01 + d02) / 2, d01 / 2, d02 / 2]])


def test_lipo_lambda_refuses_overflowing_gains():
    with pytest.raises(ValueError, match="overflows"):
        lipo_lambda_loss(torch.zeros(1, 2), None, t(0.0, 500.0)[None], torch.ones(1, 2, dtype=torch.bool), beta=1.0)


def test_group_losses_check_shapes():
    with pytest.raises(ValueError, match=r"\[G, K\] tensors of one shape"):
        plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 2, dtype=bool),
                           beta=0.1)
    with pytest.raises(ValueError, match="mask must be a bool"):
        lipo_lambda_loss(torch.zeros(1, 2), None, torch.zeros(1, 2), torch.ones(1, 2), beta=0.1)


def test_dpop_without_a_chosen_drop_is_dpo():
    """PAIR: the chosen log-ratio is +2 (policy above reference), no penalty: DPO's 0.598139 at beta 0.1."""
    losses, chosen_rewards, rejected_rewards = dpop_loss(**PAIR, beta=0.1, dpop_lambda=50.0)
    assert_close(losses, [0.598139])
    assert_close(chosen_rewards, [0.2])
    assert_close(rejected_rewards, [0.0])


def test_dpop_hand_computed_penalty():
    """Policy chosen -3 vs reference -1 (log-ratio -2), rejected -4 vs -1 (log-ratio -3): h = 1 (DPO would
    call this pair learned), penalty max(0, -1 - -3) = 2.
      lambda 0.5: beta (1 - 0.5 x 2) = 0 -> log 2 = 0.693147
      lambda 50:  0.1 x (1 - 100) = -9.9 -> log(1 + e^9.9) = 9.900050
    and the gradient on the chosen log-prob: d/d policy_chosen = -beta (1 + lambda) sigmoid(-x) = -0.1 x 51 x
    sigmoid(9.9) = -5.099747."""
    pair = dict(policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-4.0), ref_chosen_logps=t(-1.0),
                ref_rejected_logps=t(-1.0))
    assert_close(dpop_loss(**pair, beta=0.1, dpop_lambda=0.5)[0], [math.log(2)])
    assert_close(dpop_loss(**pair, beta=0.1, dpop_lambda=50.0)[0], [9.900050], tol=1e-5)
    chosen = t(-3.0).requires_grad_()
    losses, _, _ = dpop_loss(chosen, t(-4.0), t(-1.0), t(-1.0), beta=0.1, dpop_lambda=50.0)
    losses.sum().backward()
    assert_close(chosen.grad, [-0.1 * 51 / (1 + math.exp(-9.9))], tol=1e-5)
    plain, _, _ = dpo_loss(**pair, beta=0.1)
    assert plain.item() < 0.7  # DPO: h = 1 -> log(1 + e^-0.1) = 0.644397, no sign of the chosen drop


def test_dpop_lambda_must_be_non_negative():
    with pytest.raises(ValueError, match="dpop_lambda"):
        dpop_loss(**PAIR, beta=0.1, dpop_lambda=-1.0)
