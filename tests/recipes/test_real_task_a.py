"""The real recipe's Task A (:mod:`preftune.recipes.real_task_a`): held-out pairs spread over each film's samples."""

from __future__ import annotations

from preftune.evaluation.judges.python import PythonJudge
from preftune.recipes import real_task_a as recipe


def test_spread_pairs_ranks_and_skips_ties():
    """Four samples -> (best, worst) and (second, third); equal scores make no pair."""
    judge = PythonJudge(lambda prompt, response: float(len(response)))
    pairs = recipe.spread_pairs(["p", "q"], [["aaa", "a", "aaaa", "aa"], ["bb", "bb", "bb", "b"]], judge, 2)
    assert pairs == [{"prompt": "p", "chosen": "aaaa", "rejected": "a"},
                     {"prompt": "p", "chosen": "aaa", "rejected": "aa"},
                     {"prompt": "q", "chosen": "bb", "rejected": "b"}]  # q's second pair: bb vs bb, a tie
