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
    assert list(metrics) == ["loss", *PAIR_METRICS, "nll"]
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
