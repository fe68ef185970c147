"""LD-DPO's log-probs and WPO's weights (preftune.methods.losses.modifiers), worked out by hand."""

import pytest
import torch

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.modifiers import length_desensitized_logps, wpo_weights


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
