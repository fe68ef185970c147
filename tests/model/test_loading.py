"""Loading helpers: the tokenizer as it is (the data doctor's), dtype names, one-line error text; unreadable
model files, missing model paths, a missing attention package and ignored custom code, end to end through the CLI."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from preftune.cli.main import main
from preftune.model.errors import ModelFileError, first_line, safetensors_problem
from preftune.model.loading import load_model, load_tokenizer, load_tokenizer_as_is
from preftune.model.precision import resolve_dtype


def test_tokenizer_as_is(tiny_model_dir, tmp_path):
    as_is = load_tokenizer_as_is(str(tiny_model_dir))
    assert as_is.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()
    with pytest.raises(ValueError, match=r"cannot load tokenizer '.*nope'"):
        load_tokenizer_as_is(tmp_path / "nope")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="is not one of float32, bfloat16, float16, auto"):
        resolve_dtype("int8")


def test_first_line():
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"


# ------------------------------------------------------------------------------------------------
# Unreadable models: one line `preftune: error: ...` naming the file, never a traceback
# ------------------------------------------------------------------------------------------------

def _cli_errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]


def _train(model, data, out, *extra) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64", "--max-prompt-length", "32", "--no-progress", "-q",
                 *extra])


@pytest.fixture
def truncated_model_dir(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model whose model.safetensors lost its second half (the header is intact)."""
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    return folder


def test_a_truncated_safetensors_is_one_line_naming_the_file(truncated_model_dir, tiny_model_dir, rule_data,
                                                             tmp_path, capsys):
    weights = truncated_model_dir / "model.safetensors"
    size = weights.stat().st_size
    expected = (rf"^preftune: error: cannot read this model file: {re.escape(str(weights))} "
                rf"\(truncated: the header says \d+ bytes, the file has {size}\)$")
    assert _train(truncated_model_dir, rule_data["eval"], tmp_path / "policy") == 1
    [line] = _cli_errors(capsys)
    assert re.match(expected, line), line
    assert _train(tiny_model_dir, rule_data["eval"], tmp_path / "ref", "--ref-model", str(truncated_model_dir)) == 1
    assert re.match(expected, _cli_errors(capsys)[-1])
    assert main(["eval", "--model", str(truncated_model_dir), "--data", str(rule_data["eval"]), "--max-examples", "4",
                 "--max-length", "64", "--max-prompt-length", "32"]) == 1
    [line] = _cli_errors(capsys)
    assert re.match(expected, line), line


def test_safetensors_problem_reads_only_the_header(tiny_model_dir, tmp_path):
    weights = tiny_model_dir / "model.safetensors"
    assert safetensors_problem(weights) is None
    data = weights.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    cases = {b"\x01\x02": "truncated: 2 bytes, shorter than the 8-byte length of its header",
             data[:100]: f"truncated: the header says {8 + header_size} bytes of header, the file has 100",
             data[:8] + b"{" * header_size: "corrupt header: not JSON",
             data + b"\x00" * 3: "3 bytes past the end of the tensor data its header describes"}
    for i, (content, reason) in enumerate(cases.items()):
        (tmp_path / f"{i}.safetensors").write_bytes(content)
        assert reason in safetensors_problem(tmp_path / f"{i}.safetensors")
    error = ModelFileError(tmp_path / "0.safetensors", "truncated")
    assert isinstance(error, ValueError) and str(error) == f"cannot read this model file: {tmp_path}/0.safetensors " \
                                                         "(truncated)"



def test_a_header_only_the_library_refuses_gets_its_reason(tiny_model_dir, tmp_path):
    """A dtype safetensors does not know (the header is otherwise consistent): the file is named with the
    library's own reason."""
    folder = tmp_path / "odd-dtype"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"X32"', 1))
    assert safetensors_problem(weights) is None
    with pytest.raises(ModelFileError, match=rf"^cannot read this model file: {re.escape(str(weights))} \(.*X32"):
        load_model(str(folder))

def test_flash_attention_without_its_package_is_one_line(tiny_model_dir, rule_data, tmp_path, capsys):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    assert _train(tiny_model_dir, rule_data["eval"], tmp_path / "out", "--attn-implementation",
                  "flash_attention_2") == 1
    [line] = _cli_errors(capsys)
    assert line.startswith("preftune: error: --attn-implementation flash_attention_2 needs a package that is not "
                           "installed") and line.endswith("sdpa (the default) and eager need none"), line


def test_a_missing_model_says_the_model_path_does_not_exist(rule_data, tmp_path, capsys, monkeypatch):
    assert _train(tmp_path / "nope", rule_data["eval"], tmp_path / "out") == 1
    assert _cli_errors(capsys) == [f"preftune: error: model folder not found: {tmp_path / 'nope'}"]
    assert _train("runs/qs/no-such-model", rule_data["eval"], tmp_path / "out") == 1  # a relative path, not a hub id
    assert _cli_errors(capsys) == ["preftune: error: model folder not found: runs/qs/no-such-model"]

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    assert _train("someorg/some-model", rule_data["eval"], tmp_path / "out") == 1
    [line] = _cli_errors(capsys)
    assert line.startswith("preftune: error: model folder not found: someorg/some-model, and the model hub could not "
                           "provide it (We couldn't connect"), line
    assert line.endswith("pass a local folder (config.json and weights) or a .gguf file"), line
    with pytest.raises(ValueError, match="^model folder not found: someorg/some-model, and the model hub"):
        load_model("someorg/some-model")


def test_auto_map_ignored_without_trust_remote_code_is_said_once(tiny_model_dir, rule_data, tmp_path, caplog):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="preftune"):
        assert _train(folder, rule_data["eval"], tmp_path / "out", "--ref-model", str(folder)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "auto_map" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{folder / 'config.json'} names custom code (auto_map: AutoModelForCausalLM -> " \
           "modeling_custom.CustomForCausalLM)" in warnings[0]
    assert "--trust-remote-code" in warnings[0] and "built-in 'llama'" in warnings[0]


def test_a_folder_without_tokenizer_or_model_files_says_what_is_missing(tiny_model_dir, rule_data, tmp_path,
                                                                        capsys):
    """An empty folder as --model, and as `data check --tokenizer`: one line naming the missing files
    (transformers' own message is several lines about backends)."""
    from preftune.cli.main import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, rule_data["eval"], tmp_path / "out") == 1
    [line] = _cli_errors(capsys)
    assert line == (f"preftune: error: no tokenizer in {empty} (none of tokenizer.json, tokenizer_config.json, "
                    "tokenizer.model, vocab.json): copy the base model's tokenizer files into it, or pass "
                    "--tokenizer FOLDER")
    assert main(["data", "check", str(rule_data["eval"]), "--tokenizer", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"preftune: error: no tokenizer in {empty}"), err
    weights_only = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, weights_only)
    (weights_only / "config.json").unlink()
    assert _train(weights_only, rule_data["eval"], tmp_path / "out2") == 1
    [line] = _cli_errors(capsys)
    assert line.startswith(f"preftune: error: {weights_only} is not a model folder (no config.json)"), line
