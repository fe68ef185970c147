"""f-DPO's scores (preftune.methods.losses.divergences), worked out by hand."""

import pytest

from methods.losses.helpers import assert_close, t
from preftune.methods.losses.divergences import f_divergence_scores


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
