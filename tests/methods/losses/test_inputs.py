"""The checks every loss applies to its inputs (preftune.methods.losses.inputs): beta, shapes, the float32 upcast."""

import pytest
import torch

from methods.losses.helpers import PAIR, assert_close, t
from preftune.methods.losses.anchored import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from preftune.methods.losses.distributional import aot_loss, aot_unpaired_loss
from preftune.methods.losses.pairwise import (
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
)
from preftune.methods.losses.reference_free import cpo_loss, simpo_loss
from preftune.methods.losses.unpaired import apo_zero_unpaired_loss, bco_loss, kto_loss

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


def test_non_finite_margins_and_coefficients_are_refused():
    with pytest.raises(ValueError, match=r"gamma \(simpo_gamma\) must be finite"):
        simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"gamma \(simpo_gamma\) must be finite"):
        cpo_loss(t(-1.0), t(-2.0), t(0.5), beta=0.1, gamma=float("inf"))
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be finite"):
        dpo_loss(**PAIR, beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan"))
