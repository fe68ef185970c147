"""Bad input everywhere: data files, YAML configs, command lines and model folders.

Each gives a result or one clean error that says where the problem is, never another
exception or a traceback; no code from a model folder runs unless asked, and nothing is
unpickled.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from data.test_formats import RECORD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.cli.main import main
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError
from preftune.data import load_dataset
from preftune.model.loading import load_model

PACKAGE = Path(__file__).resolve().parents[2] / "preftune"
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer():
    from preftune.model.tiny import train_tokenizer

    return train_tokenizer()


# ------------------------------------------------------------------------------------------------
# data files -> load_dataset
# ------------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
# Text that tokenizes awkwardly: special tokens, control characters, long runs (truncation), emoji.
WORDS = st.text(max_size=6) | st.sampled_from(["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", " ", "\n\n",
                                               "\n\nAssistant:", "\n\nHuman:", "\u00e9\u0301", "\U0001F600",
                                               "\x00", "a" * 80, " blue", " black"])
TEXTS = st.lists(WORDS, min_size=1, max_size=6).map("".join)
CHAT = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                       "content": TEXTS}), min_size=1, max_size=4)
PLAUSIBLE = (st.fixed_dictionaries({"prompt": TEXTS, "chosen": TEXTS, "rejected": TEXTS})
             | st.fixed_dictionaries({"chosen": TEXTS, "rejected": TEXTS})
             | st.fixed_dictionaries({"prompt": CHAT, "chosen": CHAT, "rejected": CHAT})
             | st.fixed_dictionaries({"chosen": CHAT, "rejected": CHAT})
             | st.fixed_dictionaries({"prompt": TEXTS, "completion": TEXTS}, optional={"label": st.booleans()})
             | st.fixed_dictionaries({"messages": CHAT}))
RECORDS = st.lists(PLAUSIBLE | PLAUSIBLE | RECORD | JSON_VALUES, max_size=4)
SUFFIXES = st.sampled_from([".jsonl", ".json", ".jsonl.gz"])


def write(folder: str, suffix: str, data: bytes) -> Path:
    path = Path(folder) / f"fuzz{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    return path


def check_load(path: Path, tokenizer, skip_bad_records: bool) -> None:
    """Examples that honour the limits, or one DataError/ValueError that starts with the file."""
    for kind in ("pair", "unpaired", "sft"):
        try:
            examples, report = load_dataset(path, tokenizer, kind=kind, max_length=32, max_prompt_length=16,
                                            skip_bad_records=skip_bad_records)
        except ValueError as err:  # DataError is a ValueError
            assert str(err).startswith(str(path)), f"no location: {err!r}"
            assert "\n" not in str(err)
            continue
        assert report.examples_kept == len(examples)
        for ex in examples:
            assert ex.completions and all(ex.completions)
            assert all(len(ex.prompt_ids) + len(c) <= 32 for c in ex.completions)
        if kind == "pair":
            assert report.rows_read == report.examples_kept + report.bad_records + report.dropped


@FUZZ
@given(data=st.binary(max_size=300), suffix=SUFFIXES, skip=st.booleans())
def test_arbitrary_bytes_give_examples_or_a_located_error(tokenizer, data, suffix, skip):
    with tempfile.TemporaryDirectory() as folder:
        check_load(write(folder, suffix, data), tokenizer, skip)


@FUZZ
@given(rows=RECORDS, as_array=st.booleans(), suffix=SUFFIXES, skip=st.booleans())
def test_arbitrary_json_values_give_examples_or_a_located_error(tokenizer, rows, as_array, suffix, skip):
    text = json.dumps(rows) if as_array else "\n".join(json.dumps(r) for r in rows)
    with tempfile.TemporaryDirectory() as folder:
        check_load(write(folder, suffix, text.encode()), tokenizer, skip)


# ------------------------------------------------------------------------------------------------
# YAML configs
# ------------------------------------------------------------------------------------------------

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
YAML_VALUES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
               | st.sampled_from(["none", "null", "1e999", "-1", "0", "nan", "dpo", "cosine", "auto", "yes"])
               | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
YAML_MAPPINGS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), YAML_VALUES, max_size=5)


def check_yaml(path: Path) -> None:
    """A config (then validated) or one ConfigError naming the file or the option."""
    try:
        cfg = TrainConfig.from_yaml(path)
        cfg.validate(require_io=False)
    except ConfigError as err:
        assert str(path) in str(err) or str(err).startswith("--"), str(err)


@FUZZ
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
       | st.lists(st.sampled_from(["beta: ", "loss:", " - ", "{", "}", "[", "]", "&a ", "*a", "!!python/object:os.system",
                                   "\n", ": ", "'", '"', "? ", "---", "1e5", "max_steps"]), max_size=12).map("".join))
def test_arbitrary_yaml_text_gives_a_config_or_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    check_yaml(path)


@FUZZ
@given(values=YAML_MAPPINGS)
def test_arbitrary_yaml_options_give_a_config_or_config_error(tmp_path, values):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(values))
    check_yaml(path)


# Found by the properties above (each once crashed with another exception type or was accepted).
KNOWN_YAML_BUGS = [
    pytest.param(b"beta: 0.1\n\xff\xfe", id="not-utf8"),  # UnicodeDecodeError from read_text
    pytest.param(b"1: 2\n", id="non-string-key"),  # AttributeError: int has no .replace
    pytest.param(b"?\n", id="null-key"),  # AttributeError: None has no .replace
    pytest.param(("learning_rate: " + "9" * 400 + "\n").encode(), id="huge-int-for-float"),  # OverflowError
    pytest.param(b"\x1f", id="multi-line-message"),  # yaml's ReaderError text spans two lines
    pytest.param(b"learning_rate: .nan\n", id="nan-learning-rate"),  # accepted by validate()
]


@pytest.mark.parametrize("content", KNOWN_YAML_BUGS)
def test_known_bad_yaml_is_one_line_config_error(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path).validate(require_io=False)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------------------------------------------
# command lines
# ------------------------------------------------------------------------------------------------

GARBAGE = st.sampled_from(["", "-1", "0", "1", "0.5", "nan", "inf", "-inf", "1e999", "abc", "none", "true",
                           "dpo", "kto", "cosine", "float16", "latest", "--", "-", "é", "1,2", " 3 "])


def flag_and_value(name: str):
    flag = "--" + name.replace("_", "-")
    if name in ("model", "tokenizer", "ref_model", "data", "eval_data", "resume_from", "config"):
        return st.just([flag, "/nonexistent/preftune-fuzz/" + name])  # absolute: never a hub download
    if name == "output_dir":
        return st.just([flag, "{OUT}"])  # a temporary folder
    if name == "num_processes":  # a valid count would launch torchrun
        return st.tuples(st.just(flag), st.sampled_from(["0", "-1", "abc", ""])).map(list)
    return st.tuples(st.just(flag), GARBAGE).map(list) | st.just([flag]) | st.just(["--no-" + flag[2:]])


ARGS = st.lists(st.sampled_from(FIELDS + ["config", "unknown_flag"]).flatmap(flag_and_value), max_size=6)


@FUZZ
@given(args=ARGS, command=st.sampled_from(["train", "train", "nope", ""]), required=st.booleans())
def test_arbitrary_command_lines_exit_0_1_or_2_with_one_error_line(tmp_path, capsys, args, command, required):
    """Exit 0 (--help), 1 or 2 with one error line. With the required options given the run gets as far
    as loading the (missing) tokenizer: nothing trains."""
    if required:
        args = [["--model", "/nonexistent/m", "--data", "/nonexistent/d.jsonl", "--output-dir", "{OUT}"]] + args
    argv = ([command] if command else []) + [str(tmp_path / "out") if a == "{OUT}" else a for part in args for a in part]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage line(s), then "preftune ...: error: ..."; or --help / --version
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (argv, code)
    errors = [line for line in err.splitlines() if re.match(r"^preftune( train)?: error:", line)]
    assert "Traceback" not in err
    if code != 0:
        assert len(errors) == 1 or (command != "train" and not errors), (argv, err)


def test_cli_with_a_missing_model_fails_fast_with_one_line(tmp_path, capsys, tiny_model_dir, rule_data):
    code = main(["train", "--model", str(tmp_path / "nope"), "--tokenizer", str(tiny_model_dir),
                 "--data", str(rule_data["eval"]), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]
    assert code == 1 and err == [f"preftune: error: model folder not found: {tmp_path / 'nope'}"]


# ------------------------------------------------------------------------------------------------
# model folders: no remote code unless asked; no pickles
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def custom_code_folder(tmp_path, tiny_model_dir) -> Path:
    """A model folder whose config maps the Auto classes to its own Python files (which, if ever
    imported, leave a marker file behind)."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-net", architectures=["CustomNet"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomNet"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "CODE_RAN"
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def test_custom_code_model_is_refused_without_trust_remote_code(custom_code_folder, tmp_path):
    with pytest.raises(ValueError) as err:
        load_model(str(custom_code_folder))
    assert "custom code" in str(err.value) and str(custom_code_folder) in str(err.value)
    assert not (tmp_path / "CODE_RAN").exists()


def test_cli_refuses_custom_code_in_one_line(custom_code_folder, tmp_path, rule_data, capsys):
    code = main(["train", "--model", str(custom_code_folder), "--data", str(rule_data["eval"]),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]
    assert code == 1 and len(err) == 1 and "custom code" in err[0], err
    assert not (tmp_path / "CODE_RAN").exists()


def test_custom_code_refusal_names_the_flag(custom_code_folder):
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_model(str(custom_code_folder))


def test_no_pickle_is_ever_loaded():
    """Every torch.load passes weights_only=True; no pickle/dill/joblib/marshal loading anywhere."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start():text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for pattern in (r"^\s*import (c?pickle|dill|joblib|marshal)\b", r"^\s*from (c?pickle|dill|joblib|marshal) ",
                        r"\b(c?pickle|dill|joblib|marshal)\.loads?\(", r"weights_only\s*=\s*False",
                        r"use_safetensors\s*=\s*False"):
            offenders += [f"{path.name}: {m.group(0).strip()}" for m in re.finditer(pattern, text, re.M)]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# the Python API and --eval-data
# ------------------------------------------------------------------------------------------------

def test_python_api_bad_values_are_the_cli_line(tmp_path, capsys):
    """preftune.train / preftune.evaluate give the line `preftune train|eval` gives, after its source."""
    import preftune

    code = main(["eval", "--model", "m", "--data", "d", "--beta", "x"])
    cli = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and cli == "preftune: error: command line: --beta expects float, got 'x'"
    for call, source in ((lambda: preftune.evaluate("m", "d", beta="x"), "preftune.evaluate"),
                         (lambda: preftune.train(model="m", data="d", output_dir=str(tmp_path), beta="x"),
                          "preftune.train")):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == cli.replace("preftune: error: command line", source)


@pytest.mark.parametrize("call, message", [
    (lambda: __import__("preftune").train(5), "preftune.train: config expects a path to a YAML file, got int"),
    (lambda: __import__("preftune").train(["a.yaml"]), "preftune.train: config expects a path to a YAML file"),
    (lambda: __import__("preftune").evaluate("m", "d", judge=5, generate=1, ref_model="r"),
     "preftune.evaluate: judge expects a judge spec (text) or a Judge object, got int"),
])
def test_python_api_wrong_types_are_config_errors(call, message):
    """Each was a TypeError (or, for the judge, a model load first)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


class _Folder:
    def set_data(self, fingerprint, source):
        self.fingerprint = fingerprint


@pytest.mark.parametrize("how", ["same-path", "other-name", "copy"])
def test_eval_data_equal_to_data_is_warned_once(tmp_path, tokenizer, rule_data, caplog, how):
    from preftune.training.setup import read_data

    train = rule_data["eval"]
    if how == "other-name":
        (tmp_path / "link.jsonl").symlink_to(train)
    elif how == "copy":
        shutil.copy(train, tmp_path / "copy.jsonl")
    eval_data = {"same-path": train, "other-name": tmp_path / "link.jsonl", "copy": tmp_path / "copy.jsonl"}[how]
    cfg = TrainConfig(model="m", data=str(train), eval_data=str(eval_data), output_dir=str(tmp_path / "o"))
    with caplog.at_level("WARNING", logger="preftune"):
        read_data(cfg, tokenizer, _Folder(), main=True)
    warned = [r.getMessage() for r in caplog.records if "held-out metrics are measured on training data" in
              r.getMessage()]
    same = "the same content as --data" if how == "copy" else "the same file"
    assert len(warned) == 1 and f"({same})" in warned[0], warned
    caplog.clear()
    cfg.eval_data = str(rule_data["train"])  # other pairs: no warning
    with caplog.at_level("WARNING", logger="preftune"):
        read_data(cfg, tokenizer, _Folder(), main=True)
    assert not [r for r in caplog.records if "training data" in r.getMessage()]
