"""The offline quickstart (:mod:`preftune.recipes.quickstart`): its CLI flags, presets, run folder, and runs end to
end (its generated world and judge: test_quickstart_world)."""

from __future__ import annotations

import argparse
import json

import pytest

from preftune.cli.quickstart import register
from preftune.recipes.quickstart import QuickstartConfig, prepare_output_dir, run_quickstart

REPORT_FILES = [
    "report.md", "judge_scores.png", "dpo_training.png", "metrics.json", "samples.jsonl",
    "data/pretrain.jsonl", "data/sft.jsonl", "data/pairs.jsonl", "data/eval_pairs.jsonl",
    *(f"{model}/{name}" for model in ("base", "sft", "dpo")
      for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl")),
]


# ------------------------------------------------------------------------------------- the CLI


def test_cli_flags():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart"])
    assert (args.output_dir, args.quick, args.seed, args.threads, args.progress) == ("runs/quickstart", False, 0, 1,
                                                                                     True)
    args = parser.parse_args(["quickstart", "--quick", "--output-dir", "x", "--seed", "3", "--no-progress"])
    assert (args.output_dir, args.quick, args.seed, args.progress) == ("x", True, 3, False)


def test_quick_preset_is_smaller():
    full, quick = QuickstartConfig.preset(), QuickstartConfig.preset(quick=True)
    assert quick.pretrain_texts < full.pretrain_texts and quick.pair_prompts < full.pair_prompts
    assert 0.5 < quick.min_win_rate <= full.min_win_rate
    assert QuickstartConfig.preset(quick=True, seed=5).seed == 5


def test_output_dir_is_cleared_only_of_run_files(tmp_path):
    """A re-run clears its own files (train() appends to metrics.jsonl); a foreign folder is refused, untouched."""
    run = tmp_path / "run"
    (run / "dpo").mkdir(parents=True)
    (run / "dpo" / "metrics.jsonl").write_text("{}\n")
    (run / "report.md").write_text("old")
    prepare_output_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["data"]
    (tmp_path / "home" / "notes.txt").parent.mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    (tmp_path / "home" / "report.md").write_text("keep me too")
    with pytest.raises(ValueError, match="notes.txt"):
        prepare_output_dir(tmp_path / "home")
    assert (tmp_path / "home" / "report.md").read_text() == "keep me too"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        prepare_output_dir(tmp_path / "file")


# ------------------------------------------------------------------------------------- end to end


def tiny_run_config(out, **overrides) -> QuickstartConfig:
    """Every stage, as small as it goes: checks the plumbing, not the learning."""
    values = dict(output_dir=str(out), progress=False, hidden=32, layers=1, heads=2, pretrain_texts=96,
                  sft_rows=64, pair_prompts=16, samples_per_prompt=2, held_out_films=4, eval_samples=2,
                  kl_samples=1, max_new_tokens=16, dpo_epochs=1.0)
    values.update(overrides)
    return QuickstartConfig(**values)


def test_same_seed_same_numbers(tmp_path):
    """Two runs with one seed write identical metrics, samples and pairs; another seed differs."""
    first = run_quickstart(tiny_run_config(tmp_path / "a"), echo=lambda *_: None)
    second = run_quickstart(tiny_run_config(tmp_path / "b"), echo=lambda *_: None)
    other = run_quickstart(tiny_run_config(tmp_path / "c", seed=1), echo=lambda *_: None)

    def numbers(metrics: dict) -> dict:
        drop = ("seconds", "cpu_seconds", "stage_seconds", "config")
        return {k: v for k, v in metrics.items() if k not in drop}

    assert numbers(first.metrics) == numbers(second.metrics)
    for name in ("samples.jsonl", "data/pairs.jsonl", "data/eval_pairs.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    assert (tmp_path / "a" / "samples.jsonl").read_text() != (tmp_path / "c" / "samples.jsonl").read_text()
    assert numbers(first.metrics) != numbers(other.metrics)
    for name in REPORT_FILES:
        assert (tmp_path / "a" / name).is_file(), name


@pytest.mark.slow
def test_quick_quickstart_beats_sft(tmp_path):
    """The ``--quick`` run: DPO beats its SFT base on held-out films, and every report file exists."""
    lines: list[str] = []
    cfg = QuickstartConfig.preset(quick=True, output_dir=str(tmp_path / "run"), progress=False)
    result = run_quickstart(cfg, echo=lines.append)
    win = result.metrics["win_rate"]
    assert win["rate"] >= cfg.min_win_rate, win
    assert win["low"] > 0.5, win  # the 95% interval excludes a coin flip
    assert result.passed
    assert result.metrics["dpo"]["mean_score"] > result.metrics["sft"]["mean_score"]
    assert result.metrics["kl"]["mean"] > 0
    assert result.metrics["preference_accuracy"]["after"] > 0.5
    for name in REPORT_FILES:
        assert (tmp_path / "run" / name).is_file(), name
    text = "\n".join(lines)
    for stage in range(1, 7):
        assert f"[{stage}/6]" in text
    assert "win rate vs SFT" in text and "KL(DPO || SFT)" in text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["win_rate"] == win
    assert "![judge scores](judge_scores.png)" in (tmp_path / "run" / "report.md").read_text()
