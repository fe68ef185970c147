"""Options: YAML + flags, validation messages that name the option."""

from __future__ import annotations

import pytest

from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError


def valid(**kw) -> TrainConfig:
    values = dict(model="m", data="d.jsonl", output_dir="out")
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "dpp"}, "--loss: 'dpp' is not one of dpo, ipo, robust, hinge, orpo, simpo, kto, sft"),
    ({"beta": 0.0}, "--beta must be > 0 (got 0.0); beta = 0 leaves DPO's loss stuck at log 2"),
    ({"label_smoothing": 0.5}, "--label-smoothing must be in [0, 0.5) (got 0.5)"),
    ({"label_smoothing": 0.1, "loss": "ipo"},
     "--label-smoothing applies to --loss dpo, robust, exo_pair, aot, aot_unpaired, cpo or cpo_simpo only, not ipo"),
    ({"batch_size": 0}, "--batch-size must be a positive integer (got 0)"),
    ({"max_prompt_length": 600, "max_length": 512}, "--max-prompt-length (600) must be < --max-length (512)"),
    ({"dtype": "fp8"}, "--dtype: 'fp8' is not one of float32, bfloat16, float16, auto"),
    ({"precompute_ref": True, "loss": "orpo"}, "--precompute-ref: --loss orpo uses no reference model"),
    ({"merge_lora": True}, "--merge-lora needs --lora-r > 0"),
    ({"sft_weight": 1.0, "loss": "ipo"}, "--sft-weight applies to --loss dpo or simpo only, not ipo"),
])
def test_bad_values_name_the_option(kwargs, message):
    with pytest.raises(ConfigError) as err:
        valid(**kwargs).validate()
    assert message in str(err.value)


def test_required_io():
    with pytest.raises(ConfigError, match="--model is required"):
        TrainConfig(data="d", output_dir="o").validate()


def test_yaml_round_trip_and_unknown_key(tmp_path):
    cfg = valid(beta=0.25, loss="ipo", packing=False)
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown option 'betta' \(did you mean 'beta'\?\)"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "typed.yaml").write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match="--batch-size expects int, got 'eight'"):
        TrainConfig.from_yaml(tmp_path / "typed.yaml")
    (tmp_path / "broken.yaml").write_text("beta: [0.1\n")
    with pytest.raises(ConfigError, match="broken.yaml:2: invalid YAML"):
        TrainConfig.from_yaml(tmp_path / "broken.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    (tmp_path / "evil.yaml").write_text("beta: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        TrainConfig.from_yaml(tmp_path / "evil.yaml")


def test_recipes_load_and_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"dpo", "ipo", "orpo", "simpo", "kto", "sft"}
    for path in recipes:
        cfg = TrainConfig.from_yaml(path)
        cfg.model, cfg.data, cfg.output_dir = "m", "d", "o"
        cfg.validate()
        assert cfg.loss == path.stem


def test_resume_from_a_missing_path_says_it_does_not_exist(tmp_path):
    with pytest.raises(ConfigError) as err:
        valid(resume_from=str(tmp_path / "nope")).validate()
    assert str(err.value) == (f"--resume-from {tmp_path / 'nope'}: no such file or folder (give a checkpoint folder, "
                              f"OUTPUT_DIR/checkpoints/step-NNNNNN, or latest for the newest in --output-dir)")


def test_resume_from_something_else_says_what_a_checkpoint_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for given, what in (("empty", "a folder without state.json"), ("file.txt", "a file, not a folder")):
        with pytest.raises(ConfigError) as err:
            valid(resume_from=str(tmp_path / given)).validate()
        assert f"not a preftune checkpoint ({what})" in str(err.value)
        assert "holding state.json, model.safetensors, optimizer.pt, scheduler.pt and rng.pt" in str(err.value)


def test_resume_from_a_run_folder_names_its_newest_checkpoint(tmp_path):
    for step in (2, 10):
        (tmp_path / "run" / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "state.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        valid(resume_from=str(tmp_path / "run")).validate()
    assert f"--resume-from {tmp_path / 'run' / 'checkpoints' / 'step-000010'}" in str(err.value)
    valid(resume_from=str(tmp_path / "run" / "checkpoints" / "step-000002")).validate()  # a checkpoint: accepted
    valid(resume_from="latest").validate()


def test_resume_from_a_path_with_control_characters_is_one_bounded_line():
    with pytest.raises(ConfigError) as err:
        valid(resume_from="run\n" + "x" * 500).validate()
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)
