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


def test_generate_keep_all_with_a_judge_writes_response_groups_train_reads(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                           capsys):
    """Every non-empty sample with its judge score: read_examples reads the file as groups with those scores,
    and the labelling app still reads it as a candidates file."""
    import torch

    from preftune.collect.candidates import read_tasks
    from preftune.data.load import read_examples

    torch.set_num_threads(1)  # generation is many tiny matmuls
    judge = tmp_path / "judge.py"
    judge.write_text("def length(prompt, response):\n    return len(response)\n")
    (tmp_path / "prompts.txt").write_text("The river is\nThe garden is\nA cat\n")
    out = tmp_path / "groups.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--n", "4",
                 "--keep-all", "--judge", f"python:{judge}:length", "--out", str(out), "--max-new-tokens", "6",
                 "--seed", "1"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    empty = sum(4 - len(r["responses"]) for r in records)
    assert (f"{len(records)} response groups from 3 prompts (4 samples each, scored by python:{judge}:length) "
            f"written to {out}; left out: {3 - len(records)} prompts with fewer than 2 non-empty samples, "
            f"{empty} empty samples of the others") in capsys.readouterr().out
    assert records, "every prompt's samples were empty"
    for record in records:
        assert 2 <= len(record["responses"]) <= 4 and all(r.strip() for r in record["responses"])
        assert record["scores"] == record["meta"]["scores"] == [float(len(r)) for r in record["responses"]]
        assert record["meta"]["n"] == 4
    examples, report = read_examples(tiny_tokenizer, str(out), main=False, kind="group")
    assert report.bad_records == 0 and [ex.scores for ex in examples] == [r["scores"] for r in records]
    assert [len(ex.completions) for ex in examples] == [len(r["responses"]) for r in records]
    assert [t.responses for t in read_tasks(out)] == [r["responses"] for r in records]


def test_generate_keep_all_with_a_judge_needs_two_samples(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "prompts.txt").write_text("The river is\n")
    code = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--n", "1",
                 "--keep-all", "--judge", "python:os:getcwd", "--out", str(tmp_path / "groups.jsonl")])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "preftune: error: --n must be >= 2 for judged response groups (got 1)"]
    assert not (tmp_path / "groups.jsonl").exists()


def test_generate_onto_a_full_disk_is_one_line_and_leaves_no_file(tiny_model_dir, tmp_path, capsys):
    """--out is written atomically: a full disk is one error line naming it, and no partial file is left."""
    import torch

    from common.write_failures import fill_disk, one_error_line

    torch.set_num_threads(1)
    (tmp_path / "prompts.txt").write_text("The river is\nA cat\n")
    out = tmp_path / "outs" / "candidates.jsonl"
    out.parent.mkdir()
    with fill_disk(out.parent):
        code = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"),
                     "--n", "2", "--keep-all", "--out", str(out), "--max-new-tokens", "4"])
    assert code == 1
    assert "no space left on device" in one_error_line(capsys, out)
    assert list(out.parent.iterdir()) == []
