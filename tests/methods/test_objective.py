"""The objective (preftune.methods.objective): from one batch's log-probs to the loss and the TRL-named metrics
of a method or a weighted sum of methods, worked out by hand.

The standard pair: summed log-probs chosen -1 and rejected -2 (2 tokens each), reference -3 and -2, so
h = 2 and DPO at beta 0.1 gives -log sigmoid(0.2) = 0.598139; the chosen NLL per token is 1 / 2 = 0.5.
"""

import pytest
import torch

from preftune.methods.objective import PAIR_METRICS, compute_objective
from preftune.model.logprobs import LogpOutput

POLICY = LogpOutput(torch.tensor([-1.0, -2.0]), torch.tensor([2, 2]), torch.tensor([-0.5, -1.0, -0.5, -1.0]))
REF = torch.tensor([-3.0, -2.0])
TOKEN_SEQ = torch.tensor([0, 1, 0, 1])  # the tokens above, chosen and rejected interleaved


def test_one_method_gives_its_mean_loss_and_the_pair_metrics():
    loss, metrics = compute_objective("dpo", POLICY, 1, ref_logps=REF, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert list(metrics) == ["loss", *PAIR_METRICS, "logps/chosen_vs_ref", "nll"]
    assert metrics["logps/chosen_vs_ref"].item() == pytest.approx(2.0)  # -1 - (-3): the chosen side vs the ref
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2)
    assert metrics["logps/chosen"].item() == -1.0 and metrics["nll"].item() == pytest.approx(0.5)


def test_a_combination_sums_the_weighted_losses_and_logs_each():
    """dpo 0.598139 x 1 + sft 0.5 x 0.5 = 0.848139; rewards/* come from dpo, the first method with rewards."""
    loss, metrics = compute_objective("dpo,sft", POLICY, 1, ref_logps=REF, loss_weights="1,0.5", beta=0.1)
    assert loss.item() == pytest.approx(0.848139, abs=1e-6)
    assert metrics["loss/dpo"].item() == pytest.approx(0.598139, abs=1e-6)
    assert metrics["loss/sft"].item() == pytest.approx(0.5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert "loss/dpo" not in compute_objective("dpo", POLICY, 1, ref_logps=REF, beta=0.1)[1]


def test_sft_data_logs_the_nll_only():
    """Summed -3 (2 tokens) and -5 (3 tokens), one mean over tokens: 8 / 5 = 1.6."""
    policy = LogpOutput(torch.tensor([-3.0, -5.0]), torch.tensor([2, 3]), torch.zeros(5))
    loss, metrics = compute_objective("sft", policy, 2)
    assert loss.item() == pytest.approx(1.6)
    assert list(metrics) == ["loss", "nll"] and metrics["nll"].item() == pytest.approx(1.6)


def test_unpaired_metrics_split_by_label():
    """KTO, beta 1: own completions -1 (desirable) and -3 (undesirable) against reference -2, mismatched ones equal
    to the reference so z0 = 0; r = [1, -1]: 1 - sigmoid(1) = 0.268941 and 1 - sigmoid(0 - -1) = 0.268941."""
    policy = LogpOutput(torch.tensor([-1.0, -3.0, -2.0, -2.0]), torch.tensor([2, 2, 2, 2]), torch.zeros(8))
    loss, metrics = compute_objective("kto", policy, 2, ref_logps=torch.full((4,), -2.0),
                                      labels=torch.tensor([True, False]), beta=1.0)
    assert loss.item() == pytest.approx(0.268941, abs=1e-6)
    assert list(metrics) == ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                             "logps/rejected", "kl"]
    assert [metrics[k].item() for k in ("rewards/chosen", "rewards/rejected", "logps/rejected", "kl")] == [
        1.0, -1.0, -3.0, 0.0]


def test_wpo_weights_each_pair_and_logs_the_mean_weight():
    """Chosen tokens -0.5, -0.5 with log sum p^2 -1, -1: mean aligned +0.5 -> e^0.5; rejected -1, -1 with -1, -1:
    0 -> e^0 = 1; weight e^0.5 = 1.648721; loss 0.598139 x 1.648721 = 0.986164."""
    loss, metrics = compute_objective("dpo", POLICY, 1, ref_logps=REF, token_seq=TOKEN_SEQ,
                                      token_log_sum_sq=torch.full((4,), -1.0), use_weighting=True, beta=0.1)
    assert loss.item() == pytest.approx(0.986164, abs=1e-6)
    assert metrics["wpo/weights"].item() == pytest.approx(1.648721, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs reference log-probs"),
    ({"ref_logps": REF, "use_weighting": True}, "use_weighting"),
    ({"ref_logps": REF, "ld_alpha": 0.5}, "ld_alpha"),
])
def test_missing_inputs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_objective("dpo", POLICY, 1, beta=0.1, **kwargs)


def test_sigmoid_norm_is_dpo_on_token_averaged_logps():
    """Objective-level: summed log-probs chosen -6 (3 tokens), rejected -8 (4 tokens); reference -9 and -6.
    Averaged log-ratios: -6/3 - -9/3 = 1, -8/4 - -6/4 = -0.5; beta 2: -log sigmoid(2 * 1.5) = log(1 + e^-3)
    = 0.048587. Summed (dpo, beta 0.1): h = 3 - -2 = 5 -> -log sigmoid(0.5) = 0.474077."""
    policy = LogpOutput(torch.tensor([-6.0, -8.0]), torch.tensor([3, 4]), torch.zeros(7))
    ref = torch.tensor([-9.0, -6.0])
    loss, metrics = compute_objective("sigmoid_norm", policy, 1, ref_logps=ref, beta=2.0)
    assert loss.item() == pytest.approx(0.048587, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0)  # beta x averaged log-ratio
    loss, _ = compute_objective("sigmoid", policy, 1, ref_logps=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_bco_reward_shift_runs_across_batches_and_evaluation_only_reads_it():
    """Batch mean rewards (beta 1, policy - ref): batch 1 [1, -1] -> 0; batch 2 [2, 0] -> 1; the shift after
    two training batches is (0 + 1) / 2 = 0.5; an evaluation batch reads it without adding its own."""
    state, labels = {}, torch.tensor([True, False])

    def run(policy, update):
        out = LogpOutput(torch.tensor(policy), torch.tensor([2, 2]), torch.zeros(4))
        return compute_objective("bco", out, 2, ref_logps=torch.tensor([-2.0, -2.0]), labels=labels, beta=1.0,
                                 state=state, update_state=update)[1]["delta"].item()

    assert run([-1.0, -3.0], True) == pytest.approx(0.0)
    assert run([0.0, -2.0], True) == pytest.approx(0.5)
    assert run([5.0, 5.0], False) == pytest.approx(0.5)
    assert state["reward_shift"] == (pytest.approx(0.5), 2)


# ------------------------------------------------------------------------------------------------
# Batches of response groups: G groups of up to K responses, sequence s = k * G + g
# ------------------------------------------------------------------------------------------------

# Group 0: three responses scored 2, 0, 1; group 1: two responses scored 1, 3 and a padding slot.
GROUP_SCORES = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, 0.0]])
GROUP_MASK = torch.tensor([[True, True, True], [True, True, False]])
GROUP_POLICY = torch.tensor([[-4.0, -6.0, -5.0], [-3.0, -2.5, 0.0]])  # [G, K] summed log-probs
GROUP_REF = torch.tensor([[-5.0, -5.5, -5.0], [-2.0, -3.0, 0.0]])
GROUP_COUNTS = torch.tensor([[2, 3, 4], [1, 5, 0]])


def group_batch():
    """(policy LogpOutput, ref (S,)) in the batch order s = k * G + g."""
    flat = lambda grid: grid.T.reshape(-1)  # noqa: E731
    policy = LogpOutput(flat(GROUP_POLICY), flat(GROUP_COUNTS), torch.zeros(15))
    return policy, flat(GROUP_REF)


def expanded_pairs():
    """The groups' ordered pairs (ties none here) as a pair batch: group 0: (0, 2), (0, 1), (2, 1); group 1: (1, 0)."""
    pairs = [(0, 0, 1), (0, 0, 2), (0, 2, 1), (1, 1, 0)]
    chosen = [(g, i) for g, i, _ in pairs]
    rejected = [(g, j) for g, _, j in pairs]
    logps = torch.tensor([float(GROUP_POLICY[g, i]) for g, i in chosen + rejected])
    counts = torch.tensor([int(GROUP_COUNTS[g, i]) for g, i in chosen + rejected])
    ref = torch.tensor([float(GROUP_REF[g, i]) for g, i in chosen + rejected])
    return LogpOutput(logps, counts, torch.zeros(15)), ref, len(pairs)


@pytest.mark.parametrize("loss, options", [("dpo", {"sft_weight": 1.0}), ("simpo", {"simpo_gamma": 1.0}), ("dpop", {}),
                                           ("ipo", {}), ("dpo,sft", {})])
def test_a_pair_loss_on_groups_equals_it_on_the_expanded_pairs(loss, options):
    """Every pair row trains on groups through their ordered pairs: loss and metrics equal those of the same
    pairs given as a pair batch (the mean over all 4 pairs: groups weigh as many pairs as they hold)."""
    from preftune.methods import table as M

    policy, ref = group_batch()
    if not all("group" in m.kinds for m in M.parse(loss).methods):  # sft: the NLL of pair or SFT records only
        with pytest.raises(ValueError, match="does not train on response groups"):
            compute_objective(loss, policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES,
                              completion_mask=GROUP_MASK)
        return
    loss_groups, metrics_groups = compute_objective(loss, policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES,
                                                    completion_mask=GROUP_MASK, **options)
    pair_policy, pair_ref, P = expanded_pairs()
    loss_pairs, metrics_pairs = compute_objective(loss, pair_policy, P, ref_logps=pair_ref, beta=0.1, **options)
    assert abs(loss_groups.item() - loss_pairs.item()) < 1e-6
    for key in PAIR_METRICS:
        assert metrics_groups[key].item() == pytest.approx(metrics_pairs[key].item(), abs=1e-6), key


def test_dpo_on_groups_hand_computed():
    """beta 0.1; log-ratios: group 0: 1, -0.5, 0; group 1: -1, 0.5. Pairs (better, worse) and beta * h:
    (0, 1): 0.15, (0, 2): 0.1, (2, 1): 0.05, group 1 (1, 0): 0.15. Mean of log(1 + e^-x):
    (0.620957 + 0.644397 + 0.668460 + 0.620957) / 4 = 0.638693; all four rewards agree with the scores."""
    import math

    policy, ref = group_batch()
    loss, metrics = compute_objective("dpo", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES,
                                      completion_mask=GROUP_MASK)
    expected = sum(math.log1p(math.exp(-x)) for x in (0.15, 0.1, 0.05, 0.15)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.638693, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_group_pairs_best_vs_worst_trains_on_one_pair_per_group():
    """--group-pairs best-vs-worst: group 0's (0, 1), beta h = 0.15, and group 1's (1, 0), 0.15: 0.620957."""
    policy, ref = group_batch()
    loss, _ = compute_objective("dpo", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES,
                                completion_mask=GROUP_MASK, group_pairs="best-vs-worst")
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)


def test_plackett_luce_on_groups_is_the_mean_over_groups():
    """Rewards r = beta * log-ratio = 0.1, -0.05, 0 and -0.1, 0.05. Group 0 ranks 0 > 2 > 1:
    [log(e^0.1 + e^0 + e^-0.05) - 0.1] + [log(e^0 + e^-0.05) - 0] = 1.017238 + 0.668460 = 1.685698;
    group 1 (two responses) is DPO: log(1 + e^-0.15) = 0.620957; the mean over the groups 1.153327."""
    import math

    e = math.exp
    group0 = (math.log(e(0.1) + e(0) + e(-0.05)) - 0.1) + math.log(e(0) + e(-0.05))
    group1 = math.log1p(e(-0.15))
    policy, ref = group_batch()
    loss, metrics = compute_objective("plackett_luce", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES,
                                      completion_mask=GROUP_MASK)
    assert loss.item() == pytest.approx((group0 + group1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(1.153327, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["rewards/margins"].item() == pytest.approx((0.15 + 0.1 + 0.05 + 0.15) / 4, abs=1e-6)
    assert metrics["logps/chosen"].item() == pytest.approx((-4 - 4 - 5 - 2.5) / 4)


def test_group_batches_are_checked():
    policy, ref = group_batch()
    with pytest.raises(ValueError, match="does not train on response groups"):
        compute_objective("kto", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES)
    with pytest.raises(ValueError, match="trains on response groups; this batch has no scores"):
        compute_objective("lipo_lambda", policy, 2, ref_logps=ref, beta=0.1)
    with pytest.raises(ValueError, match="--ld-alpha weighs the tokens of pair records"):
        compute_objective("dpo", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES, ld_alpha=0.5)
    with pytest.raises(ValueError, match="needs scores of shape"):
        compute_objective("dpo", policy, 2, ref_logps=ref, beta=0.1, scores=GROUP_SCORES[:, :2])
    with pytest.raises(ValueError, match="needs reference log-probs"):
        compute_objective("plackett_luce", policy, 2, beta=0.1, scores=GROUP_SCORES)


def test_an_all_tied_batch_gives_zero_loss_with_a_graph():
    """No ordered pair in the batch: the pair row's loss is 0 (not NaN) and backward runs."""
    policy, ref = group_batch()
    policy.logps.requires_grad_()
    loss, _ = compute_objective("dpo", policy, 2, ref_logps=ref, beta=0.1, scores=torch.ones(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(policy.logps.grad, torch.zeros(6))
