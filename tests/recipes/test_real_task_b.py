"""The real recipe's Task B (:mod:`preftune.recipes.real_task_b`): the whole-part DPO run and its report row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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
    import preftune.recipes.real_training as real_training

    # the task's DPO trains in a process of its own (the recipe's long-lived process runs its steps slower)
    monkeypatch.setattr(real_training, "train_in_own_process", lambda config: trained.append(config) or
                        train_module.TrainResult(Path(config.output_dir), steps=184))
    monkeypatch.setattr(train_module, "train", lambda config: pytest.fail("trained in the recipe's process"))
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


def test_task_b_dpo_continues_the_sweeps_dpo_on_the_rest_of_the_part(tmp_path, monkeypatch):
    """With the sweep's share set (the full preset), the task's DPO starts from the sweep's finished dpo variant,
    trains on the rest of the DPO part against the base, and counts the sweep's steps with its own."""
    import preftune.evaluation.evaluate as evaluate_module
    import preftune.training.loop as train_module

    cfg = RealRecipeConfig.preset("full")
    assert cfg.b_sweep_pairs == cfg.b_max_steps * cfg.batch_size == 384  # one epoch of the sweep's part
    sweep_dpo = tmp_path / "b_sweep" / "dpo"
    sweep_dpo.mkdir(parents=True)
    (sweep_dpo / "config.json").write_text("{}")
    (sweep_dpo / "summary.json").write_text(json.dumps({"steps": 48}))
    trained = []
    import preftune.recipes.real_training as real_training

    monkeypatch.setattr(real_training, "train_in_own_process", lambda config: trained.append(config) or
                        train_module.TrainResult(Path(config.output_dir), steps=136))
    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda cfg: {
        "preference": {"accuracy": 0.65, "pairs": 240}, "generation": {"win_rate": {"rate": 0.7}}})
    row = recipe.task_b_dpo(cfg, tmp_path, tmp_path / "base")
    (config,) = trained
    assert (config.model, config.ref_model) == (str(sweep_dpo), str(tmp_path / "base"))
    assert config.data == str(tmp_path / "data" / "hh_dpo_rest.jsonl") and config.max_steps is None
    assert (row["steps"], row["steps_before"], row["steps_continued"]) == (184, 48, 136)
    assert row["continued_from"] == "b_sweep/dpo"
    # the sweep trains on the part's first rows
    sweep = yaml.safe_load(recipe.sweep_file(cfg, tmp_path, tmp_path / "base").read_text())
    assert sweep["data"] == str((tmp_path / "data" / "hh_dpo_sweep.jsonl").resolve())


def test_sweep_dpo_is_only_a_finished_plain_dpo_variant_at_the_tasks_beta(tmp_path):
    """What the task's DPO may continue: a finished variant with loss dpo at b_dpo_beta and no other option."""
    def finished(name: str) -> None:
        (tmp_path / "b_sweep" / name).mkdir(parents=True)
        (tmp_path / "b_sweep" / name / "config.json").write_text("{}")
        (tmp_path / "b_sweep" / name / "summary.json").write_text(json.dumps({"steps": 7}))

    def cfg(*variants, **overrides):
        return RealRecipeConfig.preset("full", b_variants=list(variants), **overrides)

    plain = {"name": "dpo", "loss": "dpo", "beta": 0.1}
    assert recipe.sweep_dpo(cfg(plain), tmp_path) is None  # not trained (no model folder)
    finished("dpo")
    finished("dpo-lr")
    finished("dpo-b0.3")
    assert recipe.sweep_dpo(cfg(plain), tmp_path) == (tmp_path / "b_sweep" / "dpo", 7)
    assert recipe.sweep_dpo(cfg(plain, b_sweep_pairs=None), tmp_path) is None  # the sweep had the whole part
    assert recipe.sweep_dpo(cfg({"name": "dpo-b0.3", "loss": "dpo", "beta": 0.3}), tmp_path) is None
    assert recipe.sweep_dpo(cfg({"name": "dpo-lr", "loss": "dpo", "beta": 0.1, "learning_rate": 1e-4}),
                            tmp_path) is None
    assert recipe.sweep_dpo(cfg({"name": "ipo", "loss": "ipo", "beta": 0.1}), tmp_path) is None


def test_task_b_data_splits_the_dpo_part_for_the_sweep_and_the_rest(tmp_path):
    """The sweep's share is the DPO part's first rows, the rest the task's DPO continues on; together the part."""
    from preftune.data.readers import read_rows

    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: no {i}",
                                      "rejected": f"\n\nHuman: question {i}?\n\nAssistant: yes {i}"}) + "\n"
                          for i in range(60)))
    cfg = RealRecipeConfig.preset("full", hh_data=str(hh), b_held_out=10, b_rm_pairs=10, b_sweep_pairs=16)
    data = recipe.task_b_data(cfg, tmp_path)
    assert (data["rows"]["dpo"], data["rows"]["sweep"], data["rows"]["dpo_rest"]) == (40, 16, 24)
    dpo, sweep_part, rest = ([row for _, row in read_rows(tmp_path / "data" / name)] for name in
                             ("hh_dpo.jsonl", "hh_dpo_sweep.jsonl", "hh_dpo_rest.jsonl"))
    assert sweep_part == dpo[:16] and rest == dpo[16:]
    with pytest.raises(ValueError, match="b_sweep_pairs 40: the DPO part has 40 pairs"):
        recipe.task_b_data(RealRecipeConfig.preset("full", hh_data=str(hh), b_held_out=10, b_rm_pairs=10,
                                                   b_sweep_pairs=40), tmp_path / "again")


def test_a_stage_trains_in_a_process_of_its_own(tiny_model_dir, rule_data, tmp_path):
    """``train_in_own_process``: a real ``preftune train`` child on the tiny model writes the run folder and
    the result is read back from it; a child that fails raises, naming its exit status."""
    from preftune.config.train_config import TrainConfig
    from preftune.recipes.real_training import train_in_own_process

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(rule_data["train"]), output_dir=str(tmp_path / "run"),
                      loss="dpo", max_steps=2, batch_size=4, max_length=64, progress=False, mixed_precision="no")
    result = train_in_own_process(cfg)
    assert result.steps == 2 and result.output_dir == tmp_path / "run"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.final_metrics == summary["final"] and (tmp_path / "run" / "model.safetensors").is_file()
    missing = TrainConfig(model=str(tmp_path / "no-model"), data=str(rule_data["train"]),
                          output_dir=str(tmp_path / "other"), loss="dpo", max_steps=1, progress=False)
    with pytest.raises(RuntimeError, match="exit status 1"):
        train_in_own_process(missing)

