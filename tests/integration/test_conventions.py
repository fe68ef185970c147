"""The conventions a TRL / Hugging Face user brings: every number checked before anything loads, no
abbreviated flags, TRL's underscore spellings, duplicated YAML keys refused, TRL config files, the
Python API (``preftune.train`` / ``preftune.evaluate`` / ``python -m preftune``), trackers
(``--report-to``) and the model card (``OUTPUT/README.md``)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import preftune
from preftune.cli.main import build_parser, config_from_args, main
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError, field_type

NOWHERE = "/nonexistent/model"  # a model that can't load: errors must come before any loading
REPO = Path(__file__).resolve().parents[2]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# 1. every numeric option validated, before anything is loaded
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0 (got -1.0); 0 or none turns clipping off; a negative "
                              "norm would flip every gradient"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0 (got -1.0)"),
    ("--seed", "-1", "--seed must be in [0, 4294967295] (got -1); the seed range of numpy and python's random"),
    ("--seed", str(2 ** 32), "--seed must be in [0, 4294967295] (got 4294967296); the seed range of numpy and "
                             "python's random"),
    ("--max-examples", "0", "--max-examples must be a positive integer (got 0)"),
    ("--warmup-steps", "-5", "--warmup-steps must be >= 0 (got -5)"),
    ("--save-total-limit", "-1", "--save-total-limit must be >= 0 (got -1)"),
    ("--learning-rate", "0", "--learning-rate must be > 0 (got 0.0)"),
    ("--epochs", "0", "--epochs must be > 0 (got 0.0)"),
    ("--warmup-ratio", "1", "--warmup-ratio must be in [0, 1) (got 1.0)"),
    ("--lora-dropout", "1.5", "--lora-dropout must be in [0, 1) (got 1.5)"),
    ("--beta", "-0.1", "--beta must be > 0 (got -0.1); beta = 0 leaves DPO's loss stuck at log 2"),
    ("--max-length", "0", "--max-length must be a positive integer (got 0)"),
    ("--logging-steps", "0", "--logging-steps must be a positive integer (got 0)"),
    ("--learning-rate", "nan", "command line: --learning-rate expects float, got 'nan'"),
])
def test_bad_numbers_are_refused_before_anything_loads(tmp_path, capsys, flag, value, message):
    """One line naming the flag and the value, exit 2, with a model path that does not exist (so the
    error can only come from validation) and no output folder created."""
    out = tmp_path / "run"
    code = main(["train", "--model", NOWHERE, "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(out),
                 flag, value])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"preftune: error: {message}"]
    assert not out.exists()


def _numeric_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if field_type(f) in (int, float)]


def test_every_numeric_option_declares_its_domain():
    """The check is one mechanism: each number's field carries its interval (``metadata["domain"]``)."""
    assert [f.name for f in _numeric_fields() if "domain" not in f.metadata] == []


@pytest.mark.parametrize("f", _numeric_fields(), ids=lambda f: f.name)
def test_a_value_just_outside_each_domain_is_refused(f):
    domain, integer = f.metadata["domain"], field_type(f) is int
    if domain.low is None:  # any finite number
        with pytest.raises(ConfigError, match="must be a finite number"):
            TrainConfig(model="m", data="d", output_dir="o", **{f.name: math.inf}).validate()
        return
    below = domain.low if domain.low_open else domain.low - (1 if integer else 0.5)
    cfg = TrainConfig(model="m", data="d", output_dir="o", **{f.name: below})
    flag = "--" + f.name.replace("_", "-")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value).startswith(f"{flag} must be {domain.describe(integer)} (got {below})")
    inside = f.default if f.default is not None else domain.low + 1
    TrainConfig(model="m", data="d", output_dir="o", **{f.name: inside}).validate()  # inside: fine


def test_wrong_types_from_python_are_named():
    with pytest.raises(ConfigError, match=r"^--batch-size expects int, got '8'$"):
        TrainConfig(model="m", data="d", output_dir="o", batch_size="8").validate()
    with pytest.raises(ConfigError, match=r"^--max-length needs a value$"):
        TrainConfig(model="m", data="d", output_dir="o", max_length=None).validate()


def test_max_grad_norm_zero_means_no_clipping_and_says_so(tiny_model_dir, rule_data, tmp_path, caplog):
    """0 keeps HF Trainer's meaning (no clipping), and the run's log says clipping is off."""
    with caplog.at_level("INFO", logger="preftune"):
        result = preftune.train(model=tiny_model_dir, data=rule_data["train"], output_dir=tmp_path / "run",
                                max_grad_norm=0, max_steps=1, max_length=64, max_prompt_length=32, logging_steps=1,
                                learning_rate=1e-3, progress=False)
    assert result.steps == 1
    assert "gradient clipping off (--max-grad-norm 0.0)" in caplog.messages
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference


# ------------------------------------------------------------------------------------------------
# 2. no abbreviations, 3. TRL's underscores
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, hint", [
    (["--lr", "1e-4"], "(--lr is the start of --lr-scheduler: flags are never abbreviated; give one in full)"),
    (["--learning-rat", "1e-4"], "(--learning-rat is the start of --learning-rate: flags are never abbreviated; "
                                 "give one in full)"),
])
def test_abbreviated_flags_are_refused(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", NOWHERE, *argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"preftune: error: unrecognized arguments: {' '.join(argv)} {hint}"


def test_sub_commands_take_no_abbreviations_either(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--mod", "m", "--data", "d"])  # --mod is not --model
    assert exit_.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_underscore_spellings_are_aliases(capsys):
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    assert parse("--learning_rate", "1e-5") == parse("--learning-rate", "1e-5")
    cfg = parse("--learning_rate", "1e-5", "--max_grad_norm", "0.5", "--skip_bad_records", "--no-length_grouped",
                "--gradient_checkpointing", "--report_to", "none")
    assert (cfg.learning_rate, cfg.max_grad_norm, cfg.skip_bad_records, cfg.length_grouped,
            cfg.gradient_checkpointing) == (1e-5, 0.5, True, False, "on")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--learning-rate" in text and "--batch-size" in text
    assert "--batch_size" not in text  # aliases stay out of --help ...
    assert text.count("--learning_rate") == 1  # ... but the epilog says they exist


# ------------------------------------------------------------------------------------------------
# 4. duplicated YAML keys
# ------------------------------------------------------------------------------------------------

def test_duplicated_yaml_key_is_an_error_naming_key_and_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nbeta: 0.1\nlearning_rate: 1.0e-5\nbeta: 0.5\n")
    code = main(["train", "--config", str(path), "--model", NOWHERE, "--data", "d", "--output-dir",
                 str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"preftune: error: {path}:4: duplicate key 'beta' (first given on line 2); YAML would keep only the last, "
        f"so say it once"]
    (tmp_path / "nested.yaml").write_text("a: {x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match=r"nested.yaml:1: duplicate key 'x'"):
        TrainConfig.from_yaml(tmp_path / "nested.yaml")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from preftune.config.yaml import load_yaml

    (tmp_path / "m.yaml").write_text("base: &b {beta: 0.1, loss: ipo}\nrun:\n  <<: *b\n  beta: 0.3\n")
    assert load_yaml(tmp_path / "m.yaml")["run"] == {"beta": 0.3, "loss": "ipo"}


# ------------------------------------------------------------------------------------------------
# 5. bring your TRL config
# ------------------------------------------------------------------------------------------------

TRL_YAML = """\
model_name_or_path: org/sft-model
dataset_name: org/pairs
dataset_train_split: train_prefs
per_device_train_batch_size: 4
per_device_eval_batch_size: 16
gradient_accumulation_steps: 2
num_train_epochs: 3
max_steps: -1
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
learning_rate: 5.0e-7
bf16: true
max_length: 512
max_prompt_length: 256
beta: 0.05
warmup_steps: 0.05
lr_scheduler_type: linear
weight_decay: 0.01
max_grad_norm: 0.5
seed: 7
output_dir: runs/trl
logging_steps: 5
eval_strategy: steps
save_strategy: steps
save_steps: 50
save_total_limit: null
gradient_checkpointing: true
optim: adamw_torch
report_to: [none]
"""


def test_trl_names_map_to_preftune_options(tmp_path, caplog):
    path = tmp_path / "trl.yaml"
    path.write_text(TRL_YAML)
    with caplog.at_level("INFO", logger="preftune"):
        cfg = TrainConfig.from_yaml(path).validate()
    assert (cfg.model, cfg.data, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps) == (
        "org/sft-model", "org/pairs:train_prefs", 4, 2, 3.0, None)
    assert (cfg.loss, cfg.loss_weights, cfg.learning_rate, cfg.mixed_precision, cfg.max_length,
            cfg.max_prompt_length, cfg.beta) == ("sigmoid,sft", "1.0,0.5", 5e-7, "bf16", 512, 256, 0.05)
    assert [m.name for m in cfg.method.methods] == ["dpo", "sft"] and cfg.method.weights == (1.0, 0.5)  # RPO
    assert (cfg.warmup_ratio, cfg.warmup_steps, cfg.lr_scheduler, cfg.weight_decay, cfg.max_grad_norm, cfg.seed) == (
        0.05, None, "linear", 0.01, 0.5, 7)
    assert (cfg.logging_steps, cfg.eval_steps, cfg.save_steps, cfg.save_total_limit, cfg.gradient_checkpointing,
            cfg.trackers) == (5, 5, 50, 0, "on", [])
    log = next(m for m in caplog.messages if "TRL names read" in m)
    for part in ("per_device_train_batch_size -> batch_size: 4", "gradient_accumulation_steps -> grad_accum: 2",
                 "num_train_epochs -> epochs: 3", "loss_type: ['sigmoid', 'sft'] -> loss: 'sigmoid,sft'",
                 "bf16: true -> mixed_precision: 'bf16'",
                 "warmup_steps: 0.05 (a share of the steps) -> warmup_ratio: 0.05",
                 "max_steps: -1 (TRL: not set) -> max_steps: none",
                 "save_total_limit: null (TRL: keep all) -> save_total_limit: 0",
                 "eval_strategy: steps (every logging_steps) -> eval_steps: 5",
                 "per_device_eval_batch_size (no effect here:", "optim: 'adamw_torch' (preftune does the same"):
        assert part in log, part


def test_a_preftune_config_reads_without_trl_notes(tmp_path, caplog):
    cfg = TrainConfig(model="m", data="d", output_dir="o", report_to="tensorboard", max_steps=None)
    cfg.save_yaml(tmp_path / "config.yaml")
    with caplog.at_level("INFO", logger="preftune"):
        assert TrainConfig.from_yaml(tmp_path / "config.yaml") == cfg
    assert not [m for m in caplog.messages if "TRL" in m]


def test_trl_peft_keys_mean_lora(tmp_path):
    (tmp_path / "peft.yaml").write_text("use_peft: true\nlora_target_modules: [q_proj, v_proj]\nloss_type: ipo\n")
    cfg = TrainConfig.from_yaml(tmp_path / "peft.yaml")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.loss) == (
        16, 32.0, 0.05, "q_proj,v_proj", "ipo")  # TRL ModelConfig's defaults for what is not given
    (tmp_path / "off.yaml").write_text("use_peft: false\nlora_r: 8\n")
    assert TrainConfig.from_yaml(tmp_path / "off.yaml").lora_r == 0  # as in TRL: no peft, lora_r unused


def test_trl_options_that_cannot_be_honoured_are_refused_by_name(tmp_path):
    (tmp_path / "bad.yaml").write_text("num_train_epochs: 2\nuse_liger_kernel: true\noptim: sgd\nloss_type: apo_zero\n"
                                       "lr_scheduler_type: cosine_with_restarts\ntorch_compile: false\n"
                                       "disable_dropout: true\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'bad.yaml'}: TRL option(s) preftune cannot honour: ")
    for part in ("use_liger_kernel: true (no Liger kernels)",
                 "disable_dropout: true (preftune keeps the model's dropout (most causal LMs have none))",
                 "optim: 'sgd' (preftune's optimizer is torch.optim.AdamW)",
                 "lr_scheduler_type: 'cosine_with_restarts' (preftune's schedules: cosine, linear, constant)"):
        assert part in message, part
    for honoured in ("num_train_epochs", "torch_compile", "loss_type"):  # apo_zero is a preftune method too
        assert honoured not in message, honoured
    (tmp_path / "warm.yaml").write_text("lr_scheduler_type: constant_with_warmup\nwarmup_steps: 3\n")
    assert TrainConfig.from_yaml(tmp_path / "warm.yaml").lr_scheduler == "constant"  # constant after the warmup
    (tmp_path / "both.yaml").write_text("per_device_train_batch_size: 4\nbatch_size: 8\n")
    with pytest.raises(ConfigError, match="per_device_train_batch_size and batch_size both given"):
        TrainConfig.from_yaml(tmp_path / "both.yaml")
    (tmp_path / "ratio.yaml").write_text("save_steps: 0.1\n")
    with pytest.raises(ConfigError, match=r"save_steps: 0.1 \(a share of the run's steps: give a step count\)"):
        TrainConfig.from_yaml(tmp_path / "ratio.yaml")


def test_trl_name_list_covers_the_installed_trl():
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'preftune[bench]')")
    from preftune.config.trl_names import TRL_NAMES

    names = {f.name for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments) for f in dataclasses.fields(cls)}
    assert sorted(names - TRL_NAMES) == []


def test_trl_yaml_trains_and_reports_its_mapping(tiny_model_dir, rule_data, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    path = tmp_path / "dpo_trl.yaml"
    path.write_text(f"model_name_or_path: {tiny_model_dir}\noutput_dir: {out}\nper_device_train_batch_size: 8\n"
                    "gradient_accumulation_steps: 1\nmax_steps: 4\nloss_type: sigmoid\nbeta: 0.1\n"
                    "learning_rate: 3.0e-3\nlr_scheduler_type: constant\nwarmup_steps: 0\nmax_length: 64\n"
                    "max_prompt_length: 32\nlogging_steps: 1\nseed: 0\nbf16: false\ndisable_tqdm: true\n")
    with caplog.at_level("INFO", logger="preftune"):
        code = main(["train", "--config", str(path), "--data", str(rule_data["train"])])
    assert code == 0
    assert "done: 4 steps" in capsys.readouterr().out
    log = next(m for m in caplog.messages if "TRL names read" in m)
    for part in ("per_device_train_batch_size -> batch_size: 8", "loss_type: 'sigmoid' -> loss: 'sigmoid'",
                 "bf16: false -> mixed_precision: 'no'", "model_name_or_path -> model: '",
                 "disable_tqdm (inverted) -> progress: false"):
        assert part in log, part
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = TrainConfig.from_yaml(out / "config.yaml")
    assert (saved.batch_size, saved.loss, saved.mixed_precision, saved.lr_scheduler) == (8, "sigmoid", "no",
                                                                                         "constant")


# ------------------------------------------------------------------------------------------------
# 6. the Python API, python -m preftune
# ------------------------------------------------------------------------------------------------

def test_import_preftune_is_light():
    code = "import sys, preftune; print(sorted(m for m in ('torch', 'transformers', 'yaml') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_python_api_trains_the_rule(tiny_model_dir, rule_data, tmp_path):
    """The same run as tests/training/test_loop.py's, through ``preftune.train``: chance -> >= 0.9 held-out accuracy;
    ``preftune.evaluate`` then measures the same accuracy on the held-out pairs."""
    out = tmp_path / "api"
    result = preftune.train(model=tiny_model_dir, data=rule_data["train"], eval_data=rule_data["eval"],
                            output_dir=out, loss="dpo", beta=0.1, learning_rate=3e-3, batch_size=8, epochs=1,
                            max_length=64, max_prompt_length=32, logging_steps=4, warmup_ratio=0.0,
                            lr_scheduler="constant", seed=0, progress=False)
    assert result.steps == 32
    assert result.eval_before["rewards/accuracies"] == 0.0
    assert result.eval_after["rewards/accuracies"] >= 0.9
    with pytest.raises(ConfigError, match=r"^preftune.train: unknown option 'learning_rat' \(close matches: "
                                          r"learning_rate\)$"):
        preftune.train(learning_rat=1e-3)
    with pytest.raises(ConfigError, match="TRL's name; preftune's is 'batch_size'"):
        preftune.train(per_device_train_batch_size=8)
    metrics = preftune.evaluate(model=out, ref_model=tiny_model_dir, data=rule_data["eval"], max_length=64,
                                max_prompt_length=32)
    assert metrics["preference"]["pairs"] == 64
    assert metrics["preference"]["accuracy"] == pytest.approx(result.eval_after["rewards/accuracies"], abs=1 / 64)
    with pytest.raises(ConfigError, match=r"unknown option 'max_len' \(close matches: max_length"):
        preftune.evaluate(model=out, data=rule_data["eval"], max_len=64)
    importlib.import_module("preftune.training.loop")  # importing the loop leaves the API functions in place

    assert preftune.train.__module__ == preftune.evaluate.__module__ == "preftune"


def test_python_api_validates_before_loading():
    with pytest.raises(ConfigError, match=r"^--max-grad-norm must be >= 0 \(got -1.0\)"):
        preftune.train(model=NOWHERE, data="d.jsonl", output_dir="o", max_grad_norm=-1)
    with pytest.raises(ConfigError, match=r"^preftune.train: --beta expects float, got 'abc'$"):
        preftune.train(model=NOWHERE, data="d.jsonl", output_dir="o", beta="abc")
    with pytest.raises(ConfigError, match="num_processes > 1 launches new processes"):
        preftune.train(model=NOWHERE, data="d.jsonl", output_dir="o", num_processes=2)


def test_python_m_preftune_is_the_console_script():
    done = subprocess.run([sys.executable, "-m", "preftune", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: preftune ") and "train" in done.stdout
    done = subprocess.run([sys.executable, "-m", "preftune", "train", "--model", NOWHERE, "--seed", "-1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("--seed must be in [0, 4294967295] (got -1); the seed range of numpy and "
                                        "python's random")


def test_readme_python_example_runs(tiny_model_dir, rule_data, tmp_path, monkeypatch):
    """The README's notebook example, with the quickstart's paths pointed at the test's tiny model and data."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\nimport preftune\n")
    example = text[start + len("```python\n"):text.index("```", start + 10)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "qs" / "data").mkdir(parents=True)
    os.symlink(tiny_model_dir, tmp_path / "runs" / "qs" / "sft")
    shutil.copy(rule_data["train"], tmp_path / "runs" / "qs" / "data" / "pairs.jsonl")
    shutil.copy(rule_data["eval"], tmp_path / "runs" / "qs" / "data" / "eval_pairs.jsonl")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["result"].steps > 0
    assert namespace["metrics"]["preference"]["pairs"] == 64
    assert (tmp_path / "runs" / "api-dpo" / "README.md").exists()


# ------------------------------------------------------------------------------------------------
# 7. trackers
# ------------------------------------------------------------------------------------------------

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, rule_data, tmp_path_factory):
    """One run, in a subprocess (``python -m preftune train``: trackers read their environment when
    imported), reporting to every installed tracker, all offline and inside a temporary folder."""
    root = tmp_path_factory.mktemp("tracked")
    names = [n for n, module in TRACKER_MODULES.items() if importlib.util.find_spec(module)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(root / "trackio"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (root / "wandb").mkdir()
    out = root / "run"
    done = subprocess.run([sys.executable, "-m", "preftune", "train", "--model", str(tiny_model_dir),
                           "--data", str(rule_data["train"]), "--output-dir", str(out), "--max-steps", "3",
                           "--logging-steps", "1", "--max-length", "64", "--max-prompt-length", "32",
                           "--learning-rate", "1e-3", "--mixed-precision", "no", "--no-progress",
                           "--run-name", "tracked", "--report-to", ",".join(names)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3]
    return {"root": root, "out": out, "losses": losses, "log": done.stderr}


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'preftune[trackers]')")


def test_tensorboard_event_file_has_the_losses(tracked_run):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run["out"] / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx(tracked_run["losses"], rel=1e-6)


def _wandb_history(path: Path) -> list[dict]:
    """History rows of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_has_the_losses(tracked_run):
    _need("wandb")
    files = glob.glob(str(tracked_run["root"] / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    logged = {row["_step"]: row["loss"] for row in _wandb_history(Path(files[0])) if "loss" in row}
    assert logged == pytest.approx(tracked_run["losses"], rel=1e-9)


def test_mlflow_file_store_has_the_losses(tracked_run):
    _need("mlflow")
    files = glob.glob(str(tracked_run["root"] / "mlruns" / "*" / "*" / "metrics" / "loss"))
    assert len(files) == 1
    logged = {int(step): float(value) for _, value, step in (line.split() for line in open(files[0]))}
    assert logged == pytest.approx(tracked_run["losses"], rel=1e-9)
    run = Path(files[0]).parents[1]
    assert (run / "params" / "learning_rate").read_text() == "0.001"  # the run's options, as parameters
    assert (run / "tags" / "mlflow.runName").read_text() == "tracked"


def test_trackio_local_database_has_the_losses(tracked_run):
    _need("trackio")
    db = sqlite3.connect(tracked_run["root"] / "trackio" / "preftune.db")
    rows = db.execute("select step, metrics from metrics where run_name = 'tracked'").fetchall()
    logged = {step: json.loads(metrics)["loss"] for step, metrics in rows if "loss" in json.loads(metrics)}
    assert logged == pytest.approx(tracked_run["losses"], rel=1e-9)


def test_missing_tracker_package_is_refused_at_validation(monkeypatch, capsys, tmp_path):
    import preftune.config.train_config

    monkeypatch.setattr(preftune.config.train_config, "_installed", lambda module: module != "wandb")
    code = main(["train", "--model", NOWHERE, "--data", "d", "--output-dir", str(tmp_path / "o"),
                 "--report-to", "tensorboard,wandb"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "preftune: error: --report-to wandb needs the wandb package: pip install wandb (or pip install "
        "'preftune[trackers]')"]


def test_report_to_names(capsys, tmp_path):
    assert TrainConfig(report_to="none").trackers == []
    assert TrainConfig(report_to="wandb, MLflow", tensorboard=True).trackers == ["wandb", "mlflow", "tensorboard"]
    assert TrainConfig(report_to="tensorboard", tensorboard=True).trackers == ["tensorboard"]
    code = main(["train", "--model", NOWHERE, "--data", "d", "--output-dir", str(tmp_path / "o"),
                 "--report-to", "comet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("preftune: error: --report-to: 'comet' is not one of tensorboard, "
                                               "wandb, mlflow, trackio, none")


# ------------------------------------------------------------------------------------------------
# 8. the model card
# ------------------------------------------------------------------------------------------------

def test_model_card_is_a_hugging_face_card(tiny_model_dir, rule_data, tmp_path):
    from huggingface_hub import ModelCard

    base = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M\n---\n\nAn SFT model.\n")
    out = tmp_path / "run"
    preftune.train(model=base, data=rule_data["train"], eval_data=rule_data["eval"], output_dir=out, loss="ipo",
                   beta=0.5, max_steps=2, max_length=64, max_prompt_length=32, learning_rate=1e-3, progress=False)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"  # the hub model the local base came from
    assert data["tags"] == ["preftune", "ipo"]
    assert (data["library_name"], data["pipeline_tag"]) == ("transformers", "text-generation")
    assert "datasets" not in data  # local files are named in the body, not as hub datasets
    sha = hashlib.sha256(rule_data["train"].read_bytes()).hexdigest()
    summary = json.loads((out / "summary.json").read_text())
    text = card.text
    assert f"- file: `{rule_data['train']}`: 256 preference pairs" in text
    assert f"- fingerprint: `sha256:{sha}`" in text
    assert "| `loss` | `ipo` |" in text and "| `beta` | `0.5` |" in text and "| steps | 2 |" in text
    assert "orpo_lambda" not in text and "simpo_gamma" not in text  # options of other methods are left out
    after = summary["eval_after"]["rewards/accuracies"]
    before = summary["eval_before"]["rewards/accuracies"]
    assert f"| rewards/accuracies | {before:.4f} | {after:.4f} |" in text
    assert summary["reference"] in text
    assert f"- preftune: {preftune.__version__}" in text
    assert not list(out.glob(".README.md.tmp-*"))  # written through a temp file, nothing left behind


def test_model_card_of_a_local_base_without_hub_lineage(tmp_path):
    """No hub id to name: no base_model in the metadata (the hub would refuse a path), the path in the body."""
    from huggingface_hub import ModelCard

    from preftune.training.model_card import write_model_card

    folder = tmp_path / "local-base"
    folder.mkdir()
    cfg = TrainConfig(model=str(folder), data=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "o"),
                      loss="simpo", lora_r=8).validate()
    (tmp_path / "o").mkdir()
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    write_model_card(tmp_path / "o", cfg, {"steps": 5, "reference": "none"}, num_examples=1)
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert "base_model" not in card.data.to_dict()
    assert card.data.library_name == "peft" and card.data.tags == ["preftune", "simpo", "lora"]
    assert f"LoRA adapters for `{folder}`" in card.text
    assert "None: the run had no held-out data" in card.text
    assert "| `simpo_gamma` | `1.0` |" in card.text and "| `lora_r` | `8` |" in card.text
