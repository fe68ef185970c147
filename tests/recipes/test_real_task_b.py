"""The real recipe's Task B (:mod:`preftune.recipes.real_task_b`): the whole-part DPO run and its report row."""

from __future__ import annotations

from pathlib import Path

from preftune.recipes import real_task_b as recipe
from preftune.recipes.real_config import RealRecipeConfig
from preftune.recipes.real_report import task_b_rows


def test_task_b_dpo_trains_the_whole_part_and_is_evaluated_as_the_variants(tmp_path, monkeypatch):
    """The task's DPO: no step cap (the sweep's variants have one), the sweep's judge, prompts, lengths and base
    cache, and its row in the report's Task B table above the sweep's."""
    import yaml

    import preftune.evaluation.evaluate as evaluate_module
    import preftune.training.loop as train_module

    cfg = RealRecipeConfig.preset("full")
    trained, evaluated = [], []
    monkeypatch.setattr(train_module, "train", lambda config: trained.append(config) or
                        train_module.TrainResult(Path(config.output_dir), steps=184))
    evaluation = {"preference": {"accuracy": 0.65, "pairs": 240}, "nll": {"difference": 0.05},
                  "generation": {"win_rate": {"rate": 0.69, "low": 0.63, "high": 0.74, "n": 240}, "kl": 5.4,
                                 "kl_stderr": 0.3}, "base_cache": {"reused": ["samples"], "stored": []}}
    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda cfg:  # an EvalConfig
                        evaluated.append((Path(cfg.model), cfg.data, cfg.to_dict())) or evaluation)
    row = recipe.task_b_dpo(cfg, tmp_path, tmp_path / "base")
    (config,) = trained
    assert (config.loss, config.beta, config.max_steps, config.epochs) == ("dpo", cfg.b_dpo_beta, None, cfg.b_epochs)
    assert config.data == str(tmp_path / "data" / "hh_dpo.jsonl") and config.output_dir == str(tmp_path / "b_dpo")
    # its reference log-probs: the sweep's shared cache (rows its variants computed are read, not recomputed)
    assert config.share_ref_cache and config.ref_cache_dir == str(tmp_path / "b_sweep" / "ref_cache")
    sweep = yaml.safe_load(recipe.sweep_file(cfg, tmp_path, tmp_path / "base").read_text())
    assert sweep["common"]["max_steps"] == cfg.b_max_steps == 48
    (model, data, options), = evaluated
    assert (model, Path(data)) == (tmp_path / "b_dpo", tmp_path / "data" / "hh_held_out.jsonl")
    for key in ("generate", "judge", "max_new_tokens", "batch_size", "seed"):
        assert options[key] == sweep["eval"][key], key
    assert (options["max_length"], options["max_prompt_length"]) == (sweep["common"]["max_length"],
                                                                     sweep["common"]["max_prompt_length"])
    assert Path(options["base_cache"]) == tmp_path / "b_sweep" / "base_cache.json"
    assert Path(options["ref_model"]) == tmp_path / "base"
    assert (row["steps"], row["accuracy"], row["win_rate"]["rate"], row["kl"]) == (184, 0.65, 0.69, 5.4)
    assert 0.58 < row["accuracy_low"] < 0.65 < row["accuracy_high"] < 0.71  # Wilson interval, n=240
    b = {"reward_model": {"accuracy": 0.62, "accuracy_low": 0.56, "accuracy_high": 0.68, "pairs": 240},
         "base_raw": {"accuracy": 0.55, "accuracy_low": 0.48, "accuracy_high": 0.61, "pairs": 240}, "dpo": row,
         "variants": [{"name": "dpo", "steps": 48, "error": None, "accuracy": 0.58, "accuracy_low": 0.5,
                       "accuracy_high": 0.6, "pairs": 240, "win_rate": None, "kl": 1.0, "nll_difference": 0.0}]}
    rows = task_b_rows(b)
    assert [(r[0], r[1]) for r in rows] == [("reward model (Bradley-Terry reward)", ""),
                                             ("base (raw log-prob preference)", ""), ("dpo (whole part)", "184"),
                                             ("dpo", "48")]
    assert rows[2][3].startswith("0.690 [0.630, 0.740]") and rows[2][4] == "5.40 +- 0.30"
