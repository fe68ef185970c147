"""Preference pairs from samples (best vs worst by a scoring or a pairwise judge) and every sample kept as
candidates, with a judge as response groups."""

from __future__ import annotations

import json

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


# ----------------------------------------------------------------------------- candidates and response groups


def test_candidate_records_with_a_judge_are_response_groups(tmp_path, tiny_tokenizer):
    """A scoring judge's scores (also meta.scores), a pairwise judge's round-robin points: 'scores' beside the
    responses, read as groups by load_dataset; without a judge no scores (a candidates file only)."""
    from preftune.data import load_dataset
    from preftune.evaluation.pairs import candidate_records

    path = tmp_path / "length.py"
    path.write_text("def length(prompt, response):\n    return len(response)\n")
    samples = [["ab", "abcd", "a"], ["xy", "zw"]]
    scored = candidate_records(["p1", "p2"], samples, make_judge(f"python:{path}:length"))
    assert [(r["responses"], r["scores"], r["meta"]["scores"]) for r in scored] == [
        (["ab", "abcd", "a"], [2.0, 4.0, 1.0], [2.0, 4.0, 1.0]), (["xy", "zw"], [2.0, 2.0], [2.0, 2.0])]
    pairwise = candidate_records(["p1", "p2"], samples, LengthPairwiseJudge(), meta={"model": "m"})
    assert [r["scores"] for r in pairwise] == [[1.0, 2.0, 0.0], [0.5, 0.5]]  # points of 2 and 1 games
    assert pairwise[0]["meta"] == {"model": "m", "n": 3}
    assert "scores" not in candidate_records(["p1"], samples[:1])[0]
    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps(r) + "\n" for r in scored + pairwise))
    examples, report = load_dataset(groups, tiny_tokenizer, "group")
    assert report.bad_records == 0
    assert [ex.scores for ex in examples] == [r["scores"] for r in scored + pairwise]


def test_onpolicy_candidates_leave_out_empty_samples_only_when_judged(tmp_path, monkeypatch):
    """Training refuses empty completions: with a judge they are left out before judging (and a prompt with
    fewer than 2 others), meta.n stays the samples drawn; without one every sample is kept for labelling."""
    from preftune.evaluation import pairs

    drawn = [["a", "", "bbb"], ["", " ", "x"], ["cc", "d", "e"]]
    monkeypatch.setattr(pairs, "sample_from_path", lambda *args: drawn)
    path = tmp_path / "length.py"
    path.write_text("def length(prompt, response):\n    return len(response)\n")
    records = pairs.onpolicy_candidates("m", ["p1", "p2", "p3"], n=3, judge=f"python:{path}:length")
    assert [(r["prompt"], r["responses"], r["scores"], r["meta"]["n"]) for r in records] == [
        ("p1", ["a", "bbb"], [1.0, 3.0], 3), ("p3", ["cc", "d", "e"], [2.0, 1.0, 1.0], 3)]
    plain = pairs.onpolicy_candidates("m", ["p1", "p2", "p3"], n=3)
    assert [r["responses"] for r in plain] == drawn and all("scores" not in r for r in plain)
    with pytest.raises(ValueError, match="--n must be >= 2 for judged response groups"):
        pairs.onpolicy_candidates("m", ["p1"], n=1, judge=f"python:{path}:length")
