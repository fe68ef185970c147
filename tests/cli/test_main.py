"""The command line: flags override the YAML file, bad values give one line and exit 2."""

from __future__ import annotations

import json

import pytest

from preftune.cli.main import build_parser, config_from_args, main


def test_flags_override_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 0.3\nloss: ipo\nbatch_size: 4\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--beta", "0.05",
                                      "--no-packing", "--model", "m"])
    cfg = config_from_args(args)
    assert (cfg.beta, cfg.loss, cfg.batch_size, cfg.packing, cfg.model) == (0.05, "ipo", 4, False, "m")


def test_bad_flag_value_is_one_line(capsys):
    code = main(["train", "--model", "m", "--data", "d", "--output-dir", "o", "--loss", "dpp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("preftune: error: --loss: 'dpp' is not one of dpo, ipo, robust, hinge, "
                                               "orpo, simpo, kto, sft, ")  # ... the method table's names
    code = main(["train", "--model", "m", "--data", "d", "--output-dir", "o", "--beta", "abc"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "preftune: error: command line: --beta expects float, got 'abc'"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--ref-model", "--data", "--eval-data", "--output-dir", "--loss", "--beta",
                 "--label-smoothing", "--learning-rate", "--batch-size", "--grad-accum", "--max-steps", "--epochs",
                 "--max-length", "--max-prompt-length", "--seed", "--precompute-ref", "--dtype", "--eval-steps",
                 "--save-steps", "--logging-steps", "--packing", "--no-packing", "--lora-r"):
        assert flag in text, flag


def test_train_command_end_to_end(tiny_model_dir, rule_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(rule_data["train"]),
                 "--eval-data", str(rule_data["eval"]), "--output-dir", str(out), "--max-steps", "2",
                 "--max-length", "64", "--max-prompt-length", "32", "--logging-steps", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed and "held-out rewards/accuracies: 0.0000 -> " in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()


def test_missing_data_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "nope.jsonl" in err[0] and err[0].startswith("preftune: error:")


def test_readme_documents_every_flag():
    """docs/reference/train-flags.md's flag table is the one generated from TrainConfig (regenerate: python -c
    'from preftune.cli.main import flags_markdown; print(flags_markdown())')."""
    from pathlib import Path

    from preftune.cli.main import flags_markdown

    readme = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "train-flags.md").read_text()
    assert flags_markdown() in readme


def test_launch_command_per_machine(monkeypatch):
    """CPU: torchrun with gloo; GPU: accelerate launch, with the config file when given, and an
    accelerate config alone (FSDP on one GPU) is reason enough to launch."""
    import torch

    from preftune.cli.main import launch_command, needs_launch
    from preftune.config.train_config import TrainConfig

    argv = ["--model", "m", "--data", "d"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = launch_command(TrainConfig(num_processes=2), argv)
    assert cpu[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    assert cpu[-6:] == ["-m", "preftune", "train", *argv][-6:]
    assert not needs_launch(TrainConfig(accelerate_config="configs/accelerate/fsdp.yaml"))
    assert needs_launch(TrainConfig(num_processes=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert needs_launch(TrainConfig(accelerate_config="configs/accelerate/fsdp.yaml"))
    assert not needs_launch(TrainConfig())
    gpu = launch_command(TrainConfig(accelerate_config="configs/accelerate/fsdp.yaml"), argv)
    assert gpu[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "1"]
    assert gpu[5:7] == ["--config_file", "configs/accelerate/fsdp.yaml"]
    assert "--multi_gpu" in launch_command(TrainConfig(num_processes=4), argv)
