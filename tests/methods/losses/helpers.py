"""What the loss tests share: a tensor shorthand, a closeness check and the standard pair.

Notation: h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected).
Useful identities: -log sigmoid(x) = log(1 + e^-x);  -log sigmoid(-x) = -log sigmoid(x) + x.
"""

import torch


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
