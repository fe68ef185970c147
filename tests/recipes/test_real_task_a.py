"""The real recipe's Task A (:mod:`preftune.recipes.real_task_a`): held-out pairs spread over each film's samples,
the training groups and pairs from the same samples."""

from __future__ import annotations

from types import SimpleNamespace

from preftune.evaluation.judges.python import PythonJudge
from preftune.recipes import real_task_a as recipe


def test_spread_pairs_ranks_and_skips_ties():
    """Four samples -> (best, worst) and (second, third); equal scores make no pair."""
    judge = PythonJudge(lambda prompt, response: float(len(response)))
    pairs = recipe.spread_pairs(["p", "q"], [["aaa", "a", "aaaa", "aa"], ["bb", "bb", "bb", "b"]], judge, 2)
    assert pairs == [{"prompt": "p", "chosen": "aaaa", "rejected": "a"},
                     {"prompt": "p", "chosen": "aaa", "rejected": "aa"},
                     {"prompt": "q", "chosen": "bb", "rejected": "b"}]  # q's second pair: bb vs bb, a tie


def test_score_groups_keeps_every_scored_sample_and_drops_groups_without_an_order():
    """All of a prompt's samples with their scores; empty samples left out; a group left with one response or
    with all scores equal is no group. ``ordered_pairs`` counts the pairs of different scores."""
    groups = recipe.score_groups(["p", "q", "r", "s"], [["a", "b", " ", "c"], ["x", "y"], ["z", ""], ["u", "v"]],
                                 [[0.5, -0.5, 0.9, 0.5], [0.1, 0.1], [0.3, 0.2], [1, 0]])
    assert groups == [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, -0.5, 0.5]},
                      {"prompt": "s", "responses": ["u", "v"], "scores": [1.0, 0.0]}]
    assert [recipe.ordered_pairs(g["scores"]) for g in groups] == [2, 1] and recipe.ordered_pairs([1, 2, 3, 4]) == 6


def test_task_a_pairs_writes_the_groups_the_pairs_come_from(tmp_path, monkeypatch):
    """Task A's data stage, its sampling stubbed: each training film's samples become one group scored by the
    sentiment judge, and its best-vs-worst pair is that group's highest- and lowest-scored responses."""
    import preftune.model.loading as loading
    from preftune.data.readers import read_rows
    from preftune.recipes.real_config import RealRecipeConfig
    from preftune.recipes.sentiment import review_sentiment

    words = ["great film", "awful film", "a film", "great great fun", "boring and awful"]

    def fake_sample(cfg, model, tokenizer, prompts, n, seed, desc):
        return [[words[(i + j) % len(words)] for j in range(n)] for i in range(len(prompts))]

    monkeypatch.setattr(recipe, "sample_in_chunks", fake_sample)
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(loading, "load_model", lambda path: SimpleNamespace(eval=lambda: None))
    cfg = RealRecipeConfig.preset("reduced", a_train_films=6, a_held_out_films=4)
    (tmp_path / "data").mkdir()
    summary = recipe.task_a_pairs(cfg, tmp_path, tmp_path / "base")
    groups = [row for _, row in read_rows(tmp_path / "data" / "a_train_groups.jsonl")]
    pairs = [row for _, row in read_rows(tmp_path / "data" / "a_train_pairs.jsonl")]
    assert summary["train_groups"] == len(groups) == len(pairs) == 6 and summary["group_responses"] == 24
    assert summary["group_ordered_pairs"] == sum(recipe.ordered_pairs(g["scores"]) for g in groups)
    for group, pair in zip(groups, pairs):
        assert group["prompt"] == pair["prompt"] and len(group["responses"]) == cfg.a_samples_per_prompt
        assert group["scores"] == [review_sentiment("", r) for r in group["responses"]]
        ranked = sorted(zip(group["scores"], group["responses"]), key=lambda item: item[0])
        assert (pair["chosen"], pair["rejected"]) == (ranked[-1][1], ranked[0][1])
