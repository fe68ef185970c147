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
    assert "PyPI" in text and "93 MB" in text and "54.5 min measured" in text
    assert f"held-out ({full.b_held_out})" in text and f"{full.a_train_films} films" in text  # the preset's numbers
    assert "DPO on all 4 reviews of each film as a response group" in text
    # the on-policy rounds split the offline run's films: the same judged samples
    assert full.a_train_films % full.a_iter_rounds == 0 and reduced.a_train_films % reduced.a_iter_rounds == 0
    assert f"{full.a_iter_rounds} rounds, each sampling 4 reviews of\n    {full.a_train_films // 3} fresh films" in text


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


def _smoke_metrics(kl=1.5, variant_error=None, accuracy=0.6, group_steps=4, rounds=2):
    rate = {"rate": 0.6, "low": 0.4, "high": 0.75, "n": 16}
    iterative = {"rounds": [{"round": n, "win_vs_base": rate, "kl": 1.0} for n in range(1, rounds + 1)],
                 "rounds_asked": 2, "win_vs_offline": rate}
    model = {"error": None, "accuracy": accuracy, "win_rate": rate, "kl": 2.0, "nll_difference": 0.05}
    group = {"steps": group_steps, "win_rate": rate, "kl": {"mean": 1.0}, "preference_accuracy": 0.5}
    return {"task_a": {"win_rate": rate, "kl": {"mean": kl}, "preference_accuracy": 0.5, "steps": 4, "group": group,
                       "iterative": iterative},
            "task_b": {"reward_model": {"accuracy": 0.55}, "base_raw": {"accuracy": 0.5},
                       "variants": [{**model, "name": "dpo"}, {**model, "name": "orpo", "error": variant_error}],
                       "dpo": model}}


def test_reduced_preset_is_a_smoke_run_and_its_checks_can_fail(tmp_path):
    assert recipe.RealRecipeConfig.preset("reduced").smoke and not recipe.RealRecipeConfig.preset("full").smoke
    for name in recipe.SMOKE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [c["ok"] for c in recipe.smoke_checks(tmp_path, _smoke_metrics())] == [True] * 7
    assert {"data/a_train_groups.jsonl", "a_group_dpo/model.safetensors"} <= set(recipe.SMOKE_FILES)
    (tmp_path / "b_dpo" / "model.safetensors").unlink()
    bad = recipe.smoke_checks(tmp_path, _smoke_metrics(kl=float("nan"), variant_error="OutputDirBusy", accuracy=1.5))
    assert [c["ok"] for c in bad] == [False, False, True, True, True, False, False]
    assert bad[0]["detail"] == "b_dpo/model.safetensors"
    assert bad[5]["detail"] == "dpo: out of range, orpo: OutputDirBusy"
    # the group run: fewer steps than best vs worst, or no group run at all, fails its check
    assert not recipe.smoke_checks(tmp_path, _smoke_metrics(group_steps=3))[2]["ok"]
    no_group = _smoke_metrics()
    del no_group["task_a"]["group"]
    assert not recipe.smoke_checks(tmp_path, no_group)[2]["ok"]
    # the on-policy rounds: a round missing (a stopped loop) or no comparison with the offline model fails
    assert not recipe.smoke_checks(tmp_path, _smoke_metrics(rounds=1))[3]["ok"]
    no_versus = _smoke_metrics()
    del no_versus["task_a"]["iterative"]["win_vs_offline"]
    assert not recipe.smoke_checks(tmp_path, no_versus)[3]["ok"]
