"""Tests for preftune.methods.losses: every loss against numbers worked out by hand.

Notation: h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected).
Useful identities: -log sigmoid(x) = log(1 + e^-x);  -log sigmoid(-x) = -log sigmoid(x) + x.
"""

import math

import pytest
import torch

from preftune.methods.losses import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    apo_zero_unpaired_loss,
    bco_loss,
    bco_pair_loss,
    bco_reward_shift,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    kto_weight_warning,
    length_desensitized_logps,
    nca_pair_loss,
    orpo_loss,
    robust_dpo_loss,
    rpo_loss,
    sft_loss,
    simpo_loss,
    sppo_hard_loss,
    wpo_weights,
)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def assert_close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual} != {expected}"


# The standard pair used below: policy chosen -1, ref chosen -3, policy rejected -2,
# ref rejected -2, so h = (-1 - -3) - (-2 - -2) = 2.
PAIR = dict(
    policy_chosen_logps=t(-1.0),
    policy_rejected_logps=t(-2.0),
    ref_chosen_logps=t(-3.0),
    ref_rejected_logps=t(-2.0),
)


# ----------------------------------------------------------------------------- DPO


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


# ----------------------------------------------------------------------------- robust DPO


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


# ----------------------------------------------------------------------------- hinge, IPO, RPO


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


# ----------------------------------------------------------------------------- ORPO


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


# ----------------------------------------------------------------------------- SimPO


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


# ----------------------------------------------------------------------------- KTO


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


# ----------------------------------------------------------------------------- shared checks

PAIRED_LOSSES = [
    lambda beta: dpo_loss(**PAIR, beta=beta),
    lambda beta: robust_dpo_loss(**PAIR, beta=beta, label_smoothing=0.1),
    lambda beta: hinge_loss(**PAIR, beta=beta),
    lambda beta: ipo_loss(**PAIR, beta=beta),
    lambda beta: simpo_loss(t(-1.0), t(-2.0), beta=beta, gamma=1.0),
    lambda beta: kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), kl=0.0, beta=beta),
    lambda beta: exo_pair_loss(**PAIR, beta=beta, label_smoothing=0.1),
    lambda beta: nca_pair_loss(**PAIR, beta=beta),
    lambda beta: bco_pair_loss(**PAIR, beta=beta),
    lambda beta: sppo_hard_loss(**PAIR, beta=beta),
    lambda beta: aot_loss(**PAIR, beta=beta),
    lambda beta: aot_unpaired_loss(**PAIR, beta=beta),
    lambda beta: apo_zero_loss(**PAIR, beta=beta),
    lambda beta: apo_down_loss(**PAIR, beta=beta),
    lambda beta: discopop_loss(**PAIR, beta=beta),
    lambda beta: cpo_loss(t(-1.0), t(-2.0), t(0.5), beta=beta),
    lambda beta: apo_zero_unpaired_loss(t(-1.0), t(-2.0), torch.tensor([True]), beta=beta),
    lambda beta: bco_loss(t(-1.0), t(-2.0), torch.tensor([True]), 0.0, beta=beta),
]


@pytest.mark.parametrize("call", PAIRED_LOSSES)
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_bad_beta_is_refused(call, beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        call(beta)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.9])
def test_dpo_label_smoothing_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**PAIR, beta=0.1, label_smoothing=eps)


def test_mismatched_shapes_are_refused():
    """(2,) against (2, 1) would silently broadcast to (2, 2)."""
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(t(-1.0, -1.0), t(-2.0, -2.0), t(-1.0, -1.0).unsqueeze(1), t(-2.0, -2.0), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        simpo_loss(t(-1.0, -1.0), t(-2.0), beta=2.0, gamma=1.0)


def test_half_precision_inputs_give_float32_outputs():
    half = {name: value.to(torch.bfloat16) for name, value in PAIR.items()}
    for loss_fn in (dpo_loss, hinge_loss, ipo_loss):
        losses, chosen_rewards, rejected_rewards = loss_fn(**half, beta=0.1)
        assert {losses.dtype, chosen_rewards.dtype, rejected_rewards.dtype} == {torch.float32}
    losses, _, _ = dpo_loss(**half, beta=0.1)
    assert_close(losses, [0.598139])  # -1, -2, -3 are exact in bf16


# ----------------------------------------------------------------------------- f-DPO


def test_f_divergence_scores_hand_computed():
    """log u = 2 (u = e^2):
    reverse_kl: 2;  forward_kl: 1 - e^-2 = 1 - 0.135335 = 0.864665
    js: log 2 + log sigmoid(2) = 0.693147 - 0.126928 = 0.566219
    alpha (a = 0.5): (e^{(0.5 - 1) * 2} - 1) / (0.5 - 1) = (0.367879 - 1) / -0.5 = 1.264241
    a = 1 is the reverse-KL limit: 2.
    """
    logratios = t(2.0)
    assert_close(f_divergence_scores(logratios, "reverse_kl"), [2.0])
    assert_close(f_divergence_scores(logratios, "forward_kl"), [0.864665])
    assert_close(f_divergence_scores(logratios, "js_divergence"), [0.566219])
    assert_close(f_divergence_scores(logratios, "alpha_divergence", 0.5), [1.264241])
    assert_close(f_divergence_scores(logratios, "alpha_divergence", 1.0), [2.0])
    with pytest.raises(ValueError, match="f_divergence_type"):
        f_divergence_scores(logratios, "hellinger")


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


# ----------------------------------------------------------------------------- TRL's other DPO loss types


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


# ----------------------------------------------------------------------------- CPO, SFT


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


def test_sft_loss_is_one_mean_over_tokens():
    """Summed log-probs -3 (2 tokens) and -5 (3 tokens): -(-3 - 5) / (2 + 3) = 8 / 5 = 1.6 for each entry
    (a per-sequence average would give (1.5 + 1.667) / 2 = 1.583)."""
    assert_close(sft_loss(t(-3.0, -5.0), torch.tensor([2, 3])), [1.6, 1.6])


# ----------------------------------------------------------------------------- unpaired: APO-zero, BCO


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


# ----------------------------------------------------------------------------- LD-DPO, WPO


def test_length_desensitized_logps_hand_computed():
    """One pair; chosen tokens [-1, -2, -3] (3), rejected [-4, -5] (2), listed interleaved
    (token_seq [0, 1, 0, 1, 0]); alpha 0.5, public length min(3, 2) = 2:
    chosen = -1 + -2 + 0.5 * -3 = -4.5; rejected = -4 + -5 = -9 (no excess).
    alpha 1 gives the plain sums -6 and -9; alpha 0 drops the excess: -3 and -9.
    """
    token_logps, token_seq = t(-1.0, -4.0, -2.0, -5.0, -3.0), torch.tensor([0, 1, 0, 1, 0])
    assert_close(length_desensitized_logps(token_logps, token_seq, 1, 0.5), [-4.5, -9.0])
    assert_close(length_desensitized_logps(token_logps, token_seq, 1, 1.0), [-6.0, -9.0])
    assert_close(length_desensitized_logps(token_logps, token_seq, 1, 0.0), [-3.0, -9.0])
    with pytest.raises(ValueError, match="ld_alpha"):
        length_desensitized_logps(token_logps, token_seq, 1, 1.5)


def test_wpo_weights_hand_computed():
    """One pair: chosen tokens log p [-1, -1] with log sum p^2 [-2, -2] -> aligned mean +1 -> e^1;
    rejected token -3 with -1 -> -2 -> e^-2; weight = e^1 * e^-2 = e^-1 = 0.367879 (detached)."""
    token_logps = t(-1.0, -1.0, -3.0).requires_grad_()
    weights = wpo_weights(token_logps, t(-2.0, -2.0, -1.0), torch.tensor([0, 0, 1]), 1)
    assert_close(weights, [0.367879])
    assert not weights.requires_grad
