"""``preftune iterate`` on the command line (:mod:`preftune.cli.iterate`): its flags (the loop's and every train
flag), a run end to end, and its one-line errors with their exit statuses (2: flags and other settings on
``--resume``; 1: a failing judge)."""

from __future__ import annotations

import json

import pytest

from preftune.cli.iterate import iterate_config
from preftune.cli.main import build_parser, config_from_args, main
from tests.recipes.test_iterate import JUDGE_SPEC, world  # noqa: F401 - the tiny world fixture


def argv(world: dict, out, *extra: str) -> list[str]:  # noqa: F811
    return ["iterate", "--model", world["model"], "--prompts", world["prompts"], "--eval-prompts", world["eval"],
            "--judge", JUDGE_SPEC, "--samples", "4", "--max-new-tokens", "12", "--kl-samples", "1",
            "--batch-size", "8", "--max-length", "48", "--learning-rate", "0.001", "--mixed-precision", "no",
            "--output-dir", str(out), "--no-progress", "-q", *extra]


def test_flags_make_the_loop_and_the_train_options():
    args = build_parser().parse_args(["iterate", "--model", "m", "--prompts", "p.txt", "--eval-prompts", "e.txt",
                                      "--judge", "python:j.py:f", "--rounds", "3", "--samples", "6", "--output-dir",
                                      "out", "--loss", "ipo", "--beta", "0.2", "--lora-r", "8", "--seed", "5",
                                      "--reference", "base", "--reuse-prompts", "--stop-when-no-gain", "--resume"])
    cfg = iterate_config(args, config_from_args)
    assert (cfg.model, cfg.prompts, cfg.eval_prompts, cfg.judge, cfg.output_dir) == ("m", "p.txt", "e.txt",
                                                                                    "python:j.py:f", "out")
    assert (cfg.rounds, cfg.samples, cfg.seed, cfg.reference) == (3, 6, 5, "base")
    assert cfg.reuse_prompts and cfg.stop_when_no_gain and cfg.resume and cfg.progress
    assert cfg.train == {"loss": "ipo", "beta": 0.2, "lora_r": 8}
    defaults = iterate_config(build_parser().parse_args(["iterate"]), config_from_args)
    assert (defaults.rounds, defaults.samples, defaults.reference, defaults.train) == (2, 4, "previous", {})


def test_help_lists_the_loop_and_train_flags(capsys):
    with pytest.raises(SystemExit):
        main(["iterate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompts", "--eval-prompts", "--judge", "--rounds", "--samples", "--reference", "--resume",
                 "--stop-when-no-gain", "--reuse-prompts", "--loss", "--beta", "--lora-r"):
        assert flag in text, flag


def test_a_run_then_other_settings_refused_on_resume(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(argv(world, out)) == 0
    said = capsys.readouterr()
    assert "done: 2 round(s)" in said.out and "report.md" in said.out
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and (out / "round-2" / "model" / "config.json").is_file()

    assert main(argv(world, out, "--beta", "0.5", "--resume")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("preftune: error: --resume:") and "\n" not in error
    assert "train.beta: None then, 0.5 now" in error

    assert main(argv(world, out)) == 1  # an earlier run, no --resume
    assert "add --resume" in capsys.readouterr().err

    assert main(argv(world, out, "--resume")) == 0  # nothing left to do: every stage kept
    assert capsys.readouterr().out.count("kept from the earlier run") == 11


def test_flags_the_loop_sets_are_refused(world, tmp_path, capsys):  # noqa: F811
    assert main(argv(world, tmp_path / "a", "--data", "pairs.jsonl")) == 2
    assert "--data: preftune iterate sets it" in capsys.readouterr().err
    assert main(argv(world, tmp_path / "b", "--ref-model", "x")) == 2
    assert "--ref-model: preftune iterate sets it" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failing_judge_is_one_line_naming_the_prompt(world, tmp_path, capsys):  # noqa: F811
    first = open(world["prompts"]).readline().strip()
    judge = tmp_path / "judge.py"
    judge.write_text(f"def score(prompt, response):\n    if prompt == {first!r}:\n"
                     "        raise TimeoutError('no answer in 60 s')\n    return len(response)\n")
    args = argv(world, tmp_path / "run")
    args[args.index("--judge") + 1] = f"python:{judge}:score"
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("preftune: error: round 1: judge") and first in error and "TimeoutError" in error
    assert "--resume" in error
