"""Preference pairs from samples: best vs worst by a scoring or a pairwise judge."""

from __future__ import annotations

import pytest

from preftune.evaluation.judges.base import CompareResult, Judge
from preftune.evaluation.judges.registry import make_judge
from preftune.evaluation.pairs import best_vs_worst_pairs

# ----------------------------------------------------------------------------- best_vs_worst_pairs


class LengthPairwiseJudge(Judge):
    """A pairwise (non-scoring) judge: the longer response wins, equal lengths tie."""

    def compare(self, prompts, responses_a, responses_b) -> CompareResult:
        outcomes = [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
                    for a, b in zip(responses_a, responses_b)]
        return CompareResult(outcomes=outcomes, ties=outcomes.count(0.5))


@pytest.mark.parametrize("kind", ["scoring", "pairwise"])
def test_best_vs_worst_pairs(kind, tmp_path):
    path = tmp_path / "length.py"
    path.write_text("def length(prompt, response):\n    return len(response)\n")
    judge = make_judge(f"python:{path}:length") if kind == "scoring" else LengthPairwiseJudge()
    prompts = ["p1", "p2", [{"role": "user", "content": "p3"}]]
    samples = [["ab", "abcd", "a", "abc"], ["xy", "zw"], ["one", "three", "three"]]
    pairs, skipped = best_vs_worst_pairs(prompts, samples, judge)
    assert skipped == 1  # p2: all samples tie
    assert pairs == [{"prompt": "p1", "chosen": "abcd", "rejected": "a"},
                     {"prompt": prompts[2], "chosen": "three", "rejected": "one"}]


def test_best_vs_worst_needs_two_samples(tmp_path):
    with pytest.raises(ValueError, match=">= 2 samples"):
        best_vs_worst_pairs(["p"], [["only one"]], LengthPairwiseJudge())
