"""The real recipe's report (:mod:`preftune.recipes.real_report`): Task A's table with the group run beside the
best-vs-worst run, in report.md and the printed summary."""

from __future__ import annotations

import copy

from preftune.recipes import real_report as report


def _side(score: float) -> dict:
    return {"mean_score": score, "positive": 0.5, "negative": 0.25, "zero": 0.25, "mean_words": 30.0}


def _run(score: float, rate: float, steps: int) -> dict:
    return {"steps": steps, "dpo": _side(score), "win_rate": {"rate": rate, "low": rate - 0.1, "high": rate + 0.05,
                                                             "n": 32},
            "kl": {"mean": 1.5, "stderr": 0.2}, "preference_accuracy": 0.75,
            "examples": [{"prompt": "Write a short review of the film The Silent River.", "base": "ok",
                          "dpo": "great", "base_score": 0.0, "dpo_score": 0.5}]}


def metrics() -> dict:
    task_a = {**_run(0.4, 0.8, 4), "base": _side(0.1), "judge": "python:j", "train_pairs": 30, "train_films": 32,
              "skipped_ties": 2, "eval_prompts": 32, "held_out_films": 16, "train_groups": 30,
              "group_responses": 118, "group_ordered_pairs": 150, "group": _run(0.6, 0.9, 4)}
    part = {"accuracy": 0.6, "accuracy_low": 0.5, "accuracy_high": 0.7, "pairs": 64}
    return {"config": {"a_samples_per_prompt": 4, "a_beta": 0.1, "a_learning_rate": 5e-5, "b_eval_prompts": 16,
                       "b_max_steps": None},
            "model": "base", "task_a": task_a,
            "task_b": {"data": {"source": "hh.jsonl", "rows": {"held_out": 64, "rm": 64, "dpo": 64}},
                       "reward_model": part, "base_raw": part, "variants": []},
            "targets": [{"name": "task A", "target": ">= 0.8", "value": "0.8", "reached": True}],
            "stage_seconds": {"model": 1.0}, "seconds": 1.0, "passed": True}


def test_task_a_table_shows_both_runs():
    a = metrics()["task_a"]
    assert report.task_a_header(a) == ("metric", "base", "DPO, best vs worst", "DPO, whole groups")
    rows = {row[0]: row[1:] for row in report.task_a_rows(a)}
    assert rows["training steps"] == ("", "4", "4")
    assert rows["judge score, mean (-1..1)"] == ("+0.100", "+0.400", "+0.600")
    assert rows["win rate vs base [95% CI]"] == ("", "0.800 [0.700, 0.850] (n=32)", "0.900 [0.800, 0.950] (n=32)")
    without = copy.deepcopy(a)
    del without["group"]  # a run folder from before the group stage: the two columns it had
    assert report.task_a_header(without) == ("metric", "base", "DPO, best vs worst")
    assert all(len(row) == 3 for row in report.task_a_rows(without))


def test_report_and_summary_carry_the_group_run(tmp_path):
    values = metrics()
    report.write_report(tmp_path, values)
    text = (tmp_path / "report.md").read_text()
    assert "| metric | base | DPO, best vs worst | DPO, whole groups |" in text
    assert "30 response groups (all 118 non-empty samples with their judge scores, 150 ordered pairs" in text
    assert "| win rate vs base [95% CI] |  | 0.800 [0.700, 0.850] (n=32) | 0.900 [0.800, 0.950] (n=32) |" in text
    assert "* DPO, groups (+0.50): great" in text
    summary = report.summary_text(tmp_path, values)
    assert "0.800 [0.700, 0.850] (n=32) | 0.900 [0.800, 0.950] (n=32)" in summary
    assert "DPO, best vs worst | DPO, whole groups" in summary


def _rate(rate: float, n: int = 32) -> dict:
    return {"rate": rate, "low": rate - 0.1, "high": rate + 0.05, "n": n}


def test_report_and_summary_carry_the_on_policy_rounds(tmp_path):
    values = metrics()
    values["task_a"]["iterative"] = {
        "rounds": [{"round": 1, "judge_score": 0.3, "win_vs_base": _rate(0.7), "win_vs_previous": _rate(0.7),
                    "kl": 2.0, "kl_stderr": 0.25, "preference_accuracy": 0.7, "pairs": 10, "steps": 2},
                   {"round": 2, "judge_score": 0.55, "win_vs_base": _rate(0.85), "win_vs_previous": _rate(0.65),
                    "kl": 4.5, "kl_stderr": None, "preference_accuracy": None, "pairs": 9, "steps": 2}],
        "rounds_asked": 2, "reference": "previous", "prompts_per_round": 16, "base_judge_score": 0.1,
        "eval_prompts": 32, "judged_samples": 128, "offline_judged_samples": 128, "steps": 4, "offline_steps": 4,
        "win_vs_offline": _rate(0.62), "score_last": 0.55, "score_offline": 0.4, "versus_prompts": 32,
        "report": "a_iterate/report.md"}
    report.write_report(tmp_path, values)
    text = (tmp_path / "report.md").read_text()
    assert "### On-policy rounds on the same budget" in text
    assert "2 rounds, each sampling 16 fresh training films" in text
    assert ("128 judged samples and 4 steps in all, as the offline best-vs-worst run (128 samples of the base, "
            "4 steps)") in text
    assert "| 0 (base) | +0.100 |" in text
    assert ("| 1 | +0.300 | 0.700 [0.600, 0.750] (n=32) | 0.700 [0.600, 0.750] (n=32) | 2.00 +- 0.25 | 0.700 | 10 "
            "| 2 |") in text
    assert "| 2 | +0.550 | 0.850 [0.750, 0.900] (n=32) | 0.650 [0.550, 0.700] (n=32) | 4.50 | n/a | 9 | 2 |" in text
    assert "win rate **0.620 [0.520, 0.670] (n=32)** (judge score +0.550 vs +0.400)" in text
    summary = report.summary_text(tmp_path, values)
    assert "last round vs offline DPO: 0.620 [0.520, 0.670] (n=32)" in summary
