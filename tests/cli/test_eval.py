"""``preftune eval``'s flags come from EvalConfig: bad values are one line and exit 2 before any model loads;
``--config`` reads a YAML of the same names, overridden by the flags (``--model`` and ``--data`` are flags)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from preftune.cli.eval import eval_config_from_args, eval_flags_markdown, register
from preftune.cli.main import main


def parse(argv: list[str]) -> argparse.Namespace:
    root = argparse.ArgumentParser(prog="preftune")
    register(root.add_subparsers(dest="command"))
    return root.parse_args(["eval", *argv])


@pytest.mark.parametrize("flags, message", [
    (["--generate", "-1"], "--generate must be >= 0 (got -1)"),
    (["--kl-samples", "0"], "--kl-samples must be a positive integer (got 0)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer (got 0)"),
    (["--top-p", "2"], "--top-p must be in (0, 1] (got 2.0)"),
    (["--temperature", "-1"], "--temperature must be >= 0 (got -1.0)"),
    (["--batch-size", "0"], "--batch-size must be a positive integer (got 0)"),
    (["--max-length", "-5"], "--max-length must be a positive integer (got -5)"),
    (["--beta", "0"], "--beta must be > 0 (got 0.0)"),
    (["--generate", "many"], "command line: --generate expects int, got 'many'"),
    (["--generate", "2"], "--generate compares samples of the model with the base's: it needs --ref-model"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"preftune: error: {message}"]


def test_model_and_data_are_required_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--data", "d.jsonl"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_config_file_is_read_and_flags_override_it(tmp_path):
    (tmp_path / "eval.yaml").write_text("ref_model: ./sft\ngenerate: 8\nmax_length: 256\nmodel: ignored\n")
    cfg = eval_config_from_args(parse(["--config", str(tmp_path / "eval.yaml"), "--model", "runs/dpo", "--data",
                                       "held.jsonl", "--max-length", "128"]))
    assert (cfg.model, cfg.data, cfg.ref_model, cfg.generate, cfg.max_length) == ("runs/dpo", "held.jsonl", "./sft",
                                                                                 8, 128)
    assert cfg.mixed_precision == "auto"  # the command line's default
    (tmp_path / "no.yaml").write_text("mixed_precision: 'no'\n")
    assert eval_config_from_args(parse(["--config", str(tmp_path / "no.yaml"), "--model", "m", "--data", "d"])
                                 ).mixed_precision == "no"
    plain = eval_config_from_args(parse(["--model", "m", "--data", "d", "--trust-remote-code"]))
    assert plain.trust_remote_code is True and plain.generate == 0 and plain.kl_samples == 1


def test_bad_config_file_exits_2(tmp_path, capsys):
    (tmp_path / "eval.yaml").write_text("kl_samples: 0\n")
    assert main(["eval", "--config", str(tmp_path / "eval.yaml"), "--model", "m", "--data", "d"]) == 2
    assert capsys.readouterr().err.strip() == (f"preftune: error: {tmp_path / 'eval.yaml'}: --kl-samples must be a "
                                               "positive integer (got 0)")  # the file the value came from


def test_every_flag_is_in_help_and_in_the_docs_table(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = capsys.readouterr().out
    table = eval_flags_markdown()
    for flag in ("--model", "--ref-model", "--data", "--nll-data", "--generate", "--judge", "--kl-samples", "--beta",
                 "--max-length", "--max-prompt-length", "--max-examples", "--base-cache", "--max-new-tokens",
                 "--temperature", "--top-p", "--seed", "--batch-size", "--dtype", "--mixed-precision",
                 "--trust-remote-code"):
        assert flag in text and f"`{flag}" in table, flag


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1] (got 0.0)"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer (got -3)"),
    (["--dtype", "fp8"], "--dtype: 'fp8' is not one of float32, bfloat16, float16, auto"),
])
def test_generate_shares_the_sampling_flags_and_their_ranges(tmp_path, capsys, flags, message):
    code = main(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "no-prompts.txt"),
                 "--judge", "python:os:getcwd", "--out", str(tmp_path / "pairs.jsonl"), *flags])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"preftune: error: {message}"]


def write_sweep(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_compare_refuses_bad_variant_options_before_anything_runs(tmp_path, capsys):
    """A key typo or an out-of-range value in any variant: exit 2, one line naming the variant and the key,
    before any variant trains (the output folder is not even created)."""
    config = write_sweep(tmp_path / "sweep.yaml", base=str(tmp_path / "m"), data="d.jsonl", eval_data="e.jsonl",
                         output_dir=str(tmp_path / "out"),
                         variants=[{"name": "ok"}, {"name": "betta", "betta": 0.1}, {"name": "neg", "beta": -1}])
    assert main(["compare", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"preftune: error: {config}: variant betta: unknown option 'betta' (did you mean 'beta'?)"]
    assert not (tmp_path / "out").exists()


def test_compare_exits_1_naming_the_failed_variants_and_still_writes_the_report(tiny_model_dir, rule_data, tmp_path,
                                                                               capsys):
    out = tmp_path / "out"
    config = write_sweep(
        tmp_path / "sweep.yaml", base=str(tiny_model_dir), data=str(rule_data["train"]),
        eval_data=str(rule_data["eval"]), output_dir=str(out), isolate=False, train_eval=False,
        eval={"max_examples": 8},
        common={"max_steps": 2, "batch_size": 4, "max_length": 64, "max_prompt_length": 32},
        variants=[{"name": "ok"}, {"name": "no-ref", "ref_model": str(tmp_path / "missing-model")}])
    assert main(["compare", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("preftune: error: 1 of 2 variants failed: no-ref (") and "missing-model" in errors[0]
    assert "ok (" not in errors[0]
    assert f"report: {out / 'report.md'}" in captured.out and (out / "report.md").exists()
    rows = {r["name"]: r["status"] for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows == {"ok": "done", "no-ref": "failed"}
