"""EvalConfig: every ``preftune eval`` option with its range, the combinations refused before loading, YAML
and Python keywords read through the same field machinery as TrainConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from preftune.config.eval_config import EvalConfig
from preftune.config.values import ConfigError, flags_markdown


def valid(**kw) -> EvalConfig:
    return EvalConfig(**{"model": "m", "data": "d.jsonl", **kw})


@pytest.mark.parametrize("kwargs, message", [
    ({"generate": -1}, "--generate must be >= 0 (got -1)"),
    ({"kl_samples": 0}, "--kl-samples must be a positive integer (got 0)"),
    ({"beta": 0.0}, "--beta must be > 0 (got 0.0)"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be a positive integer (got 0)"),
    ({"temperature": -0.5}, "--temperature must be >= 0 (got -0.5)"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1] (got 1.5)"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1] (got 0.0)"),
    ({"batch_size": 0}, "--batch-size must be a positive integer (got 0)"),
    ({"max_examples": 0}, "--max-examples must be a positive integer (got 0)"),
    ({"seed": -1}, "--seed must be in [0, 4294967295] (got -1)"),
    ({"dtype": "fp8"}, "--dtype: 'fp8' is not one of float32, bfloat16, float16, auto"),
    ({"mixed_precision": "fp8"}, "--mixed-precision: 'fp8' is not one of auto, no, bf16, fp16"),
    ({"max_prompt_length": 64, "max_length": 64}, "--max-prompt-length (64) must be < --max-length (64)"),
    ({"generate": 4}, "--generate compares samples of the model with the base's: it needs --ref-model"),
    ({"judge": "python:os:getcwd", "ref_model": "b"}, "--judge is used on generated samples: also pass --generate N"),
    ({"model": None}, "--model is required"),
    ({"data": ""}, "--data is required"),
])
def test_bad_values_name_the_option(kwargs, message):
    with pytest.raises(ConfigError) as err:
        valid(**kwargs).validate()
    assert message in str(err.value)


def test_defaults_are_valid_and_a_judge_object_counts_as_a_judge():
    assert valid().validate() == valid()
    assert valid(ref_model="b", generate=2, judge="python:os:getcwd").validate().generate == 2
    with pytest.raises(ConfigError, match="also pass --generate"):
        valid(ref_model="b").validate(judge_given=True)


def test_every_option_has_help_and_numbers_have_a_range():
    for f in dataclasses.fields(EvalConfig):
        assert f.metadata["help"].strip(), f.name
        if f.type.startswith(("int", "float")):
            assert "domain" in f.metadata, f.name


def test_yaml_reads_the_option_names_and_refuses_unknown_ones(tmp_path):
    (tmp_path / "eval.yaml").write_text("model: runs/dpo\ndata: held.jsonl\nmax-length: 256\ngenerate: '8'\n")
    cfg = EvalConfig.from_yaml(tmp_path / "eval.yaml")
    assert (cfg.model, cfg.data, cfg.max_length, cfg.generate) == ("runs/dpo", "held.jsonl", 256, 8)
    (tmp_path / "bad.yaml").write_text("kl_sample: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'kl_sample' \(did you mean 'kl_samples'\?\)"):
        EvalConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("beta: 0.1\nbeta: 0.2\n")
    with pytest.raises(ConfigError, match="twice.yaml:2: duplicate key 'beta'"):
        EvalConfig.from_yaml(tmp_path / "twice.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert EvalConfig.from_yaml(tmp_path / "empty.yaml") == EvalConfig()


def test_python_keywords_take_paths_and_name_close_matches_and_trl_names(tmp_path):
    cfg = EvalConfig.from_options({"model": tmp_path, "data": Path("d.jsonl"), "max_length": "64"}, "api")
    assert (cfg.model, cfg.data, cfg.max_length) == (str(tmp_path), "d.jsonl", 64)
    with pytest.raises(ConfigError, match=r"^api: unknown option 'max_len' \(close matches: max_length"):
        EvalConfig.from_options({"max_len": 64}, "api")
    with pytest.raises(ConfigError, match="TRL's name; preftune's is 'batch_size'"):
        EvalConfig.from_options({"per_device_train_batch_size": 8}, "api")
    with pytest.raises(ConfigError, match="api: --generate expects int, got 'many'"):
        EvalConfig.from_options({"generate": "many"}, "api")


def test_markdown_table_has_a_row_per_flag_with_its_range():
    table = flags_markdown(EvalConfig)
    rows = [line for line in table.splitlines()[2:]]
    flagged = [f for f in dataclasses.fields(EvalConfig) if f.metadata.get("flag", True)]
    assert len(rows) == len(flagged)
    assert "| `--kl-samples` | `1` |" in table and "Must be a positive integer." in table
    assert "| `--mixed-precision` | `auto` |" in table  # the command line's default
    assert "--device" not in table and "--packing" not in table  # Python-only options


def test_an_error_about_a_value_from_a_file_names_the_file(tmp_path):
    """As for preftune train's config: `judge: x` without `generate` came from the file, so the file is named."""
    path = tmp_path / "eval.yaml"
    path.write_text("judge: python:m:f\nbeta: 0.2\n")
    cfg = EvalConfig.from_yaml(path)
    cfg.model, cfg.data = "m", "d"
    with pytest.raises(ConfigError, match=f"^{path}: --judge is used on generated samples"):
        cfg.validate()
    cfg.judge = "python:m:g"  # no longer the file's value (a flag given after --config)
    with pytest.raises(ConfigError, match="^--judge is used on generated samples"):
        cfg.validate()
