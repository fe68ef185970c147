"""The SFT loss (preftune.methods.losses.sft), worked out by hand."""

import torch

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.sft import sft_loss


def test_sft_loss_is_one_mean_over_tokens():
    """Summed log-probs -3 (2 tokens) and -5 (3 tokens): -(-3 - 5) / (2 + 3) = 8 / 5 = 1.6 for each entry
    (a per-sequence average would give (1.5 + 1.667) / 2 = 1.583)."""
    assert_close(sft_loss(t(-3.0, -5.0), torch.tensor([2, 3])), [1.6, 1.6])
