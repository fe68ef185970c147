"""TRL-style config files: every error about one names the file (and the TRL key a value came from), in one
line, whatever the wrong key or value; a flag given after the file is the command line's, not the file's."""

from __future__ import annotations

import pytest

from preftune.cli.main import main
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError


@pytest.mark.parametrize("text, says", [
    ("disable_tqdm: maybe\n", "disable_tqdm: 'maybe' (expects true or false)"),
    ("bf16: maybe\n", "bf16: 'maybe' (expects true or false)"),
    ("use_peft: maybe\nlora_target_modules: all-linear\n", "use_peft: 'maybe' (expects true or false)"),
    ("optim: [adamw_torch]\n", "optim: ['adamw_torch']"),  # was a TypeError (unhashable list) traceback
    ("truncation_mode: {a: 1}\n", "truncation_mode: {'a': 1}"),
    ("loss_type: 5\n", "loss_type: 5 (a loss name or a list of loss names)"),  # was TypeError: int not iterable
    ("loss_type: [sigmoid, 3]\n", "loss_type: ['sigmoid', 3]"),
    ("dataset_name: {a: 1}\n", "not {'a': 1}"),  # was the repr "{'a': 1}" as the data path
    ("loss_type: sigmoidd\n", "loss_type -> --loss: 'sigmoidd' is not one of"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size -> --batch-size must be a positive integer"),
    ("lr_scheduler_type: linear\nwarmup_ratio: 1.5\n", "--warmup-ratio must be in [0, 1)"),
    ("beta: -1\nloss_type: ipo\n", "--beta must be > 0"),
])
def test_a_trl_yaml_error_names_the_file(tmp_path, text, says):
    path = tmp_path / "trl_dpo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path).validate(require_io=False)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message, message


def test_a_flag_given_after_the_file_is_named_as_the_command_lines(tmp_path, capsys):
    path = tmp_path / "trl_dpo.yaml"
    path.write_text("loss_type: ipo\nbeta: 0.1\n")
    code = main(["train", "--config", str(path), "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o"),
                 "--beta", "-1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]
    assert code == 2 and err == ["preftune: error: --beta must be > 0 (got -1.0); beta = 0 leaves DPO's loss stuck "
                                 "at log 2"]
