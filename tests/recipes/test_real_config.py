"""The real recipe's settings (:mod:`preftune.recipes.real_config`): presets, help text, targets."""

from __future__ import annotations

import pytest

from preftune.recipes import real_config as recipe


def test_presets_and_help():
    full, reduced = recipe.RealRecipeConfig.preset("full"), recipe.RealRecipeConfig.preset("reduced")
    assert full.b_held_out >= full.target_b_accuracy_pairs  # the accuracy target is reachable on its pairs
    assert {v["loss"] for v in full.b_variants} == {"dpo", "ipo", "simpo", "orpo", "kto"}
    assert sum(v["loss"] == "dpo" for v in full.b_variants) == 2
    assert reduced.a_train_films < full.a_train_films and reduced.b_held_out < full.b_held_out
    assert len(reduced.b_variants) < len(full.b_variants)
    assert full.b_max_steps and full.b_dpo_max_steps is None  # the sweep is capped, the task's DPO is not
    assert recipe.RealRecipeConfig.preset("reduced", seed=4).seed == 4
    with pytest.raises(ValueError, match="unknown preset"):
        recipe.RealRecipeConfig.preset("tiny")
    text = recipe.help_text()
    assert "PyPI" in text and "93 MB" in text and "158 min measured" in text
    assert f"held-out ({full.b_held_out})" in text and f"{full.a_train_films} films" in text  # the preset's numbers


def _metrics(a_rate, a_low, accuracy, pairs, b_rate, b_low) -> dict:
    sweep_dpo = {"name": "dpo", "accuracy": 0.1, "pairs": 10, "win_rate": {"rate": 0.1, "low": 0.0, "high": 1.0}}
    return {"task_a": {"win_rate": {"rate": a_rate, "low": a_low, "high": 1.0, "n": 128}},
            "task_b": {"dpo": {"name": "dpo (whole part)", "accuracy": accuracy, "pairs": pairs,
                               "win_rate": {"rate": b_rate, "low": b_low, "high": 1.0, "n": 64}},
                       "variants": [sweep_dpo]}}  # the targets read the whole-part run, not the sweep's dpo


def test_targets_reached_and_not():
    cfg = recipe.RealRecipeConfig()
    assert all(t["reached"] for t in recipe.check_targets(cfg, _metrics(0.85, 0.78, 0.62, 378, 0.7, 0.6)))
    reached = [t["reached"] for t in recipe.check_targets(cfg, _metrics(0.85, 0.49, 0.62, 150, 0.59, 0.51))]
    assert reached == [False, False, False]  # CI low <= 0.5; too few pairs; rate below 0.6
    missing = {"task_a": _metrics(0.9, 0.8, 0, 0, 0, 0)["task_a"],
               "task_b": {"variants": [{"name": "dpo", "accuracy": 0.9, "pairs": 240,
                                        "win_rate": {"rate": 0.9, "low": 0.8, "high": 1.0, "n": 240}}]}}
    assert [t["reached"] for t in recipe.check_targets(cfg, missing)] == [True, False, False]  # no whole-part run
