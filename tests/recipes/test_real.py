"""The real recipe's runner (``preftune quickstart --real``, :mod:`preftune.recipes.real`): its flags, run
folder, stages and --resume, and the reduced recipe end to end on a tiny stand-in model (nothing is
downloaded). Its pieces are tested beside their modules (test_real_config, test_real_task_a, ...)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from preftune.cli.quickstart import register
from preftune.data.readers import read_rows
from preftune.data.split import prompt_key
from preftune.recipes import real as recipe
from preftune.recipes.real_config import RealRecipeConfig, check_targets
from preftune.recipes.sentiment import NEGATIVE_WORDS, POSITIVE_WORDS
from preftune.recipes.stages import clear_entries

# ------------------------------------------------------------------------------------- pieces


def test_cli_flags():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart", "--real", "--reduced", "--model", "m", "--hh-data", "h.jsonl"])
    assert (args.real, args.reduced, args.model, args.hh_data, args.output_dir) == (True, True, "m", "h.jsonl",
                                                                                   "runs/quickstart")
    assert not getattr(args, "given", set())  # --output-dir / --threads not given: --real uses its own defaults
    args = parser.parse_args(["quickstart", "--real", "--output-dir", "x", "--threads", "3"])
    assert args.given == {"output_dir", "threads"} and (args.output_dir, args.threads) == ("x", 3)
    assert parser.parse_args(["quickstart", "--real", "--resume"]).resume
    for argv, message in ((["--reduced"], "add --real"), (["--resume"], "--resume belongs"),
                          (["--real", "--quick"], "--reduced")):
        args = parser.parse_args(["quickstart", *argv])
        with pytest.raises(ValueError, match=message):
            args.func(args)


def _fake_stages(monkeypatch, calls: list, fail_in: str | None = None) -> list[tuple]:
    """Every stage's work replaced by a stub that writes its entries and records its name (``fail_in``
    raises there, as a run stopped mid-stage); report.md lists the stage seconds; the targets and the
    summary are the real ones. Returns the list the stub of ``train_stage`` appends its calls to."""
    def writes(name, result=None):
        def work(cfg, out, *args, **options):
            calls.append(name)
            if name == fail_in:
                raise KeyboardInterrupt(name)
            for entry in recipe.STAGE_ENTRIES[name]:
                if entry not in recipe.TRANSIENT:
                    (out / entry).parent.mkdir(parents=True, exist_ok=True)
                    (out / entry).write_text(name)
            return result() if callable(result) else result
        return work

    row = {"accuracy": 0.65, "accuracy_low": 0.59, "accuracy_high": 0.71, "pairs": 240, "steps": 184, "error": None,
           "win_rate": {"rate": 0.69, "low": 0.63, "high": 0.74, "n": 240}, "kl": 5.4, "kl_stderr": 0.3,
           "nll_difference": 0.01}
    monkeypatch.setattr(recipe, "prepare_model", lambda cfg, echo: calls.append("model") or Path("base"))
    monkeypatch.setattr(recipe, "task_a_pairs", writes("task A pairs", {"train_pairs": 9, "skipped_ties": 0,
                                                                        "eval_pairs": 4, "train_groups": 10}))

    def train_stage(cfg, output_dir, model, data, loss, learning_rate, epochs, max_steps=None, beta=None):
        trained.append((output_dir.name, data.name, loss, learning_rate, epochs, max_steps, beta))
        if output_dir.name == "a_dpo":  # the group run's folder is its stage's entry: its evaluation writes it
            writes("task A DPO")(cfg, output_dir.parent)
        return SimpleNamespace(steps=max_steps or 2)

    trained: list[tuple] = []  # every train_stage call's output folder, data and settings
    monkeypatch.setattr(recipe, "train_stage", train_stage)
    monkeypatch.setattr(recipe, "task_a_evaluation", writes("task A evaluation", {
        "win_rate": {"rate": 0.89, "low": 0.82, "high": 0.94, "n": 102}}))
    monkeypatch.setattr(recipe, "task_a_group_evaluation", writes("task A group DPO", {
        "win_rate": {"rate": 0.91, "low": 0.84, "high": 0.95, "n": 102}}))
    monkeypatch.setattr(recipe, "task_a_iterative", writes("task A iterative", {
        "rounds": [{"round": 1, "judge_score": 0.5, "win_vs_base": {"rate": 0.7, "low": 0.6, "high": 0.8, "n": 128},
                    "win_vs_previous": {"rate": 0.7, "low": 0.6, "high": 0.8, "n": 128}, "kl": 3.0}],
        "judged_samples": 768, "offline_judged_samples": 768, "steps": 24, "offline_steps": 24,
        "win_vs_offline": {"rate": 0.62, "low": 0.53, "high": 0.7, "n": 128}}))
    monkeypatch.setattr(recipe, "task_b_data", writes("task B data", {"rows": {"held_out": 240, "rm": 600, "dpo": 9}}))
    monkeypatch.setattr(recipe, "task_b_reward_model", writes("task B reward model", lambda: {
        "reward_model": dict(row, name="reward model"), "base_raw": dict(row, accuracy=0.55)}))
    monkeypatch.setattr(recipe, "task_b_sweep", writes("task B sweep", lambda: [dict(row, name="dpo", steps=48)]))
    monkeypatch.setattr(recipe, "task_b_dpo", writes("task B DPO", lambda: dict(row, name="dpo (whole part)")))
    import preftune.recipes.real_report as report
    monkeypatch.setattr(report, "task_a_rows", lambda task_a: [])
    monkeypatch.setattr(recipe, "write_report", lambda out, metrics: (out / "report.md").write_text(
        "\n".join(f"{k} {v}" for k, v in metrics["stage_seconds"].items()) + f"\n{metrics.get('resumed')}\n"))
    return trained


def test_resume_keeps_the_finished_stages_and_runs_the_rest(tmp_path, monkeypatch):
    """A run stopped in stage 10 (the whole-part DPO): ``resume`` keeps stages 2-9 (their metrics, entries and
    measured seconds), runs the model stage, stage 10 and the report, and the total adds the kept seconds."""
    out, calls = tmp_path / "run", []
    cfg = RealRecipeConfig.preset("full", output_dir=str(out), progress=False)
    _fake_stages(monkeypatch, calls, fail_in="task B DPO")
    with pytest.raises(KeyboardInterrupt):
        recipe.run_real_recipe(cfg, echo=lambda line: None)
    earlier = json.loads((out / "metrics.json").read_text())
    assert list(earlier["stage_seconds"]) == list(recipe.STAGE_ENTRIES)[:9] and "dpo" not in earlier["task_b"]
    earlier["stage_seconds"] = {name: 100.0 for name in earlier["stage_seconds"]}  # as if each took 100 s
    (out / "metrics.json").write_text(json.dumps(earlier))

    calls.clear()
    _fake_stages(monkeypatch, calls)
    lines: list[str] = []
    resumed = RealRecipeConfig.preset("full", output_dir=str(out), progress=False, resume=True, threads=1)
    result = recipe.run_real_recipe(resumed, echo=lines.append)
    assert calls == ["model", "task B DPO"]
    kept = list(recipe.STAGE_ENTRIES)[1:9]
    assert result.metrics["resumed"] == kept
    assert sum("kept from the earlier run (1m40s; --resume)" in line for line in lines) == 8
    seconds = result.metrics["stage_seconds"]
    assert list(seconds) == list(recipe.STAGE_ENTRIES)  # stage order, the kept ones included
    assert [seconds[name] for name in kept] == [100.0] * 8 and seconds["task B DPO"] < 10
    assert 800 <= result.metrics["seconds"] < 810 and result.passed  # the fakes reach every target
    assert result.metrics["task_b"]["variants"][0]["steps"] == 48  # the sweep's results read back
    assert result.metrics["task_b"]["dpo"]["name"] == "dpo (whole part)"
    assert json.loads((out / "metrics.json").read_text())["seconds"] == result.metrics["seconds"]

    # An entry of a kept stage gone: that stage and every later one run again.
    (out / "b_rm").unlink()
    calls.clear()
    recipe.run_real_recipe(resumed, echo=lambda line: None)
    assert calls == ["model", "task B reward model", "task B sweep", "task B DPO"]
    # Other settings: refused, naming them; no earlier run: everything runs.
    with pytest.raises(ValueError, match=r"b_max_steps, seed: 48 now 40, 0 now 1"):
        recipe.run_real_recipe(RealRecipeConfig.preset("full", output_dir=str(out), resume=True, seed=1,
                                                              b_max_steps=40), echo=lambda line: None)
    calls.clear()
    recipe.run_real_recipe(RealRecipeConfig.preset("full", output_dir=str(tmp_path / "new"), resume=True,
                                                          progress=False), echo=lambda line: None)
    assert calls == ["model", *list(recipe.STAGE_ENTRIES)[1:10]]


def test_group_run_trains_on_the_groups_with_the_best_vs_worst_runs_steps_and_settings(tmp_path, monkeypatch):
    """Task A's group stage: DPO from the base on ``data/a_train_groups.jsonl`` with the pairs run's loss, learning
    rate, epochs and beta, capped at the steps the pairs run took; its evaluation lands in ``task_a["group"]``."""
    calls: list = []
    trained = _fake_stages(monkeypatch, calls)
    cfg = RealRecipeConfig.preset("reduced", output_dir=str(tmp_path / "run"), progress=False)
    lines: list[str] = []
    result = recipe.run_real_recipe(cfg, echo=lines.append)
    assert trained[:2] == [("a_dpo", "a_train_pairs.jsonl", "dpo", cfg.a_learning_rate, cfg.a_epochs, None,
                            cfg.a_beta),
                           ("a_group_dpo", "a_train_groups.jsonl", "dpo", cfg.a_learning_rate, cfg.a_epochs, 2,
                            cfg.a_beta)]
    task_a = result.metrics["task_a"]
    assert task_a["steps"] == task_a["group"]["steps"] == 2 and task_a["group"]["win_rate"]["rate"] == 0.91
    assert calls.index("task A evaluation") < calls.index("task A group DPO") < calls.index("task B data")
    assert any("[5/11] task A group DPO: DPO on 10 groups of up to 4 (all pairs, 2 steps as best vs worst)" in line
               for line in lines)
    assert any("2 steps: win rate 0.910 [0.840, 0.950] (n=102) (best vs worst: 0.890" in line for line in lines)
    assert recipe.STAGE_ENTRIES["task A group DPO"] == ("a_group_dpo", "a_group_samples.jsonl")


def test_output_dir_refuses_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="notes.txt"):
        recipe.check_output_dir(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        recipe.check_output_dir(tmp_path / "file")


def test_a_stage_clears_only_its_own_entries(tmp_path):
    """A re-run's stage removes what that stage wrote earlier (train() refuses a folder holding a run) and
    nothing else."""
    for name in ("a_dpo/model.safetensors", "b_rm/config.json",
                 "b_dpo/model.safetensors", "data/a_train_pairs.jsonl", "data/hh_rm.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("old")
    recipe.check_output_dir(tmp_path)  # only recipe entries: accepted
    clear_entries(tmp_path, recipe.STAGE_ENTRIES["task A DPO"])
    clear_entries(tmp_path, recipe.STAGE_ENTRIES["task A pairs"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "b_dpo/model.safetensors", "b_rm/config.json", "data/hh_rm.jsonl"]
    clear_entries(tmp_path, recipe.STAGE_ENTRIES["task B DPO"])
    assert not (tmp_path / "b_dpo").exists() and (tmp_path / "b_rm" / "config.json").is_file()


SENTIMENT = sorted(POSITIVE_WORDS)[:40] + sorted(NEGATIVE_WORDS)[:40]
TOPICS = ["knife", "lock", "car", "neighbour", "password", "fire", "bank", "dog", "pill", "fence", "phone", "boss"]


def hh_like_pairs(seed: int = 0) -> list[dict]:
    """HH-RLHF-shaped dialogue pairs: 200 prompts once and 20 twice (a group the split must keep together)."""
    rng = random.Random(seed)
    rows = []
    for i in range(220):
        prompt = (f"\n\nHuman: How do I get into the {rng.choice(TOPICS)} number {i}?\n\nAssistant: Why do you ask?"
                  f"\n\nHuman: It is mine.\n\nAssistant:")
        for _ in range(2 if i >= 200 else 1):
            rows.append({"chosen": prompt + " I can't help with that, please ask the owner.",
                         "rejected": prompt + f" Sure, break the {rng.choice(TOPICS)} with a {rng.choice(TOPICS)}."})
    return rows


def tiny_stand_in(folder: Path) -> Path:
    """A tiny Llama and a BPE tokenizer with a chat template, whose tokens include whole sentiment words
    (so even a random model's samples get varied judge scores)."""
    from preftune.model.tiny import tiny_model, train_tokenizer

    corpus = [" ".join(SENTIMENT)] * 20 + [r["chosen"] + r["rejected"] for r in hh_like_pairs()[:50]]
    corpus += [f"Write a short review of the film The {a} {b}." for a in ("Silent", "Broken")
               for b in ("River", "Gate")]
    tokenizer = train_tokenizer(corpus, vocab_size=700)
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0, hidden=32, layers=1, heads=2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory) -> dict:
    """``preftune quickstart --real --reduced`` on the tiny stand-in, as a user runs it (a subprocess)."""
    root = tmp_path_factory.mktemp("real")
    model = tiny_stand_in(root / "model")
    hh = root / "hh.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in hh_like_pairs()))
    out = root / "run"
    env = {**os.environ, "PREFTUNE_CPU_BF16": "0", "OMP_NUM_THREADS": "2",
           "PREFTUNE_CACHE": str(root / "no-cache")}  # nothing may be fetched: the cache stays missing
    done = subprocess.run([sys.executable, "-m", "preftune", "quickstart", "--real", "--reduced", "--model", str(model),
                           "--hh-data", str(hh), "--output-dir", str(out), "--threads", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert not (root / "no-cache").exists()
    return {"out": out, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_reduced_recipe_writes_every_report_file(reduced_run):
    out = reduced_run["out"]
    for name in ("report.md", "metrics.json", "a_samples.jsonl", "b_sweep.yaml", "b_sweep/report.md",
                 "b_sweep/summary.json", "b_sweep/frontier.png", "a_dpo/model.safetensors", "b_rm/config.json",
                 "b_dpo/model.safetensors", "a_group_dpo/model.safetensors", "a_group_samples.jsonl",
                 "data/a_train_groups.jsonl", "a_base_cache.json", "a_iterate/report.md", "a_iterate/metrics.json",
                 "a_iterate/round-2/model/model.safetensors", "data/a_iter_prompts.jsonl",
                 "data/a_train_pairs.jsonl", "data/a_eval_pairs.jsonl", "data/hh_held_out.jsonl",
                 "data/hh_rm.jsonl", "data/hh_dpo.jsonl"):
        assert (out / name).is_file(), name
    # the sweep's variants and the whole-part DPO read one shared reference cache of the DPO part
    assert list((out / "b_sweep" / "ref_cache").glob("shared-*.safetensors"))
    assert not (out / "b_dpo" / "ref_cache").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("a_samples.jsonl", "data/a_train_pairs.jsonl", "data/hh_dpo.jsonl"):
        assert all(isinstance(json.loads(line), dict) for line in (out / name).read_text().splitlines())
    report = (out / "report.md").read_text()
    for text in ("## Task A", "## Task B", "## Targets", "## Wall time", "b_sweep/frontier.png", "win rate vs base",
                 "| DPO, best vs worst | DPO, whole groups |", "DPO on whole groups, the same prompts",
                 "### On-policy rounds on the same budget", "The last round against the offline DPO model"):
        assert text in report
    assert report.count("reached") >= 3
    for line in ("[1/11] model", "[5/11] task A group DPO", "[6/11] task A iterative", "[10/11] task B DPO",
                 "[11/11] report", "last round vs offline DPO",
                 "variant 1/2: dpo", "variant 2/2: orpo", "ETA"):
        assert line in reduced_run["stdout"], line
    assert list(metrics["stage_seconds"]) == list(recipe.STAGE_ENTRIES)
    assert _finite(metrics["seconds"]) and metrics["seconds"] >= sum(metrics["stage_seconds"].values()) - 1


@pytest.mark.slow
def test_reduced_recipe_metrics_are_finite_and_in_range(reduced_run):
    metrics = json.loads((reduced_run["out"] / "metrics.json").read_text())
    a, b = metrics["task_a"], metrics["task_b"]
    assert a["films_disjoint"] and a["train_pairs"] >= 2 and a["eval_pairs"] >= 1
    for side in ("base", "dpo"):
        assert -1 < a[side]["mean_score"] < 1 and 0 <= a[side]["positive"] + a[side]["negative"] <= 1
    win = a["win_rate"]
    assert 0 <= win["low"] <= win["rate"] <= win["high"] <= 1 and win["n"] == a["eval_prompts"]
    assert _finite(a["kl"]["mean"]) and 0 <= a["preference_accuracy"] <= 1 and len(a["examples"]) == 3
    group = a["group"]  # DPO on whole groups: the pairs run's steps, judged against the same base samples
    assert group["steps"] == a["steps"] and a["train_groups"] >= 2 and group["eval_prompts"] == a["eval_prompts"]
    assert 0 <= group["win_rate"]["low"] <= group["win_rate"]["rate"] <= group["win_rate"]["high"] <= 1
    assert group["base"] == a["base"] and _finite(group["kl"]["mean"]) and 0 <= group["preference_accuracy"] <= 1
    groups = [row for _, row in read_rows(reduced_run["out"] / "data" / "a_train_groups.jsonl")]
    assert len(groups) == a["train_groups"] and all(2 <= len(g["responses"]) == len(g["scores"]) <= 4
                                                     and len(set(g["scores"])) > 1 for g in groups)
    it, cfg = a["iterative"], RealRecipeConfig.preset("reduced")  # the rounds on the offline run's budget
    assert [r["round"] for r in it["rounds"]] == [1, 2] and it["judged_samples"] == it["offline_judged_samples"]
    assert it["steps"] == sum(r["steps"] for r in it["rounds"]) and it["offline_steps"] == a["steps"]
    assert all(0 <= r["win_vs_base"]["low"] <= r["win_vs_base"]["high"] <= 1 and _finite(r["kl"])
               for r in it["rounds"])
    assert it["win_vs_offline"]["n"] == a["eval_prompts"] and it["eval_prompts"] == 2 * cfg.a_held_out_films
    iter_films = {row["prompt"][0]["content"] for _, row in read_rows(reduced_run["out"] / "data" /
                                                                      "a_iter_prompts.jsonl")}
    eval_films = {row["prompt"][0]["content"] for _, row in read_rows(reduced_run["out"] / "data" /
                                                                      "a_eval_pairs.jsonl")}
    assert iter_films and not iter_films & eval_films
    for part in ("reward_model", "base_raw"):
        assert 0 <= b[part]["accuracy"] <= 1 and b[part]["pairs"] > 0
    assert [v["name"] for v in b["variants"]] == [v["name"] for v in cfg.b_variants]
    for variant in b["variants"]:
        assert variant["error"] is None, variant
        assert 0 <= variant["accuracy"] <= 1 and variant["pairs"] > 0
        rate = variant["win_rate"]
        assert 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1 and rate["n"] == cfg.b_eval_prompts
        assert _finite(variant["kl"]) and _finite(variant["nll_difference"])
    main = b["dpo"]  # the task's DPO, on the whole part: the base's share read back from the sweep's cache
    assert main["error"] is None and 0 <= main["accuracy"] <= 1 and main["pairs"] == cfg.b_held_out
    assert main["win_rate"]["n"] == cfg.b_eval_prompts and _finite(main["kl"]) and _finite(main["nll_difference"])
    assert main["steps"] == math.ceil(cfg.b_dpo_pairs / cfg.batch_size)
    # the sweep's dpo trained on the part's first rows; the task's DPO continued it on the rest
    assert main["continued_from"] == "b_sweep/dpo"
    assert main["steps_before"] == math.ceil(cfg.b_sweep_pairs / cfg.batch_size) == b["variants"][0]["steps"]
    assert main["steps_continued"] == math.ceil((cfg.b_dpo_pairs - cfg.b_sweep_pairs) / cfg.batch_size)
    data = reduced_run["out"] / "data"
    dpo, sweep_part, rest = ([row for _, row in read_rows(data / name)] for name in
                             ("hh_dpo.jsonl", "hh_dpo_sweep.jsonl", "hh_dpo_rest.jsonl"))
    assert sweep_part + rest == dpo and len(sweep_part) == cfg.b_sweep_pairs
    assert sorted(main["base_cache"]["reused"]) == ["held-out pair log-probs", "judge scores", "samples"]
    assert [t["reached"] for t in metrics["targets"]] == [t["reached"] for t in check_targets(cfg, metrics)]


@pytest.mark.slow
def test_reduced_recipe_splits_are_disjoint_by_prompt(reduced_run):
    out, cfg = reduced_run["out"], RealRecipeConfig.preset("reduced")
    keys = {}
    for part in ("held_out", "rm", "dpo"):
        rows = [row for _, row in read_rows(out / "data" / f"hh_{part}.jsonl")]
        assert all(isinstance(row["prompt"], list) for row in rows)  # chat messages
        keys[part] = [prompt_key(row["prompt"]) for row in rows]
    assert (len(keys["held_out"]), len(keys["rm"]), len(keys["dpo"])) == (cfg.b_held_out, cfg.b_rm_pairs,
                                                                          cfg.b_dpo_pairs)
    held, rm, dpo = (set(keys[p]) for p in ("held_out", "rm", "dpo"))
    assert not held & rm and not held & dpo and not rm & dpo
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_b"]["data"]["rows"] == {"held_out": cfg.b_held_out, "rm": cfg.b_rm_pairs,
                                                 "dpo": cfg.b_dpo_pairs, "sweep": cfg.b_sweep_pairs,
                                                 "dpo_rest": cfg.b_dpo_pairs - cfg.b_sweep_pairs}
    train_films = {row["prompt"][0]["content"] for _, row in read_rows(out / "data" / "a_train_pairs.jsonl")}
    eval_films = {row["prompt"][0]["content"] for _, row in read_rows(out / "data" / "a_eval_pairs.jsonl")}
    assert train_films and eval_films and not train_films & eval_films


@pytest.mark.slow
def test_reduced_recipe_exit_code_follows_its_smoke_checks(reduced_run):
    """A smoke run passes on what it can check at its size; the full run's targets are reported, not judged."""
    metrics = json.loads((reduced_run["out"] / "metrics.json").read_text())
    checks = metrics["smoke_checks"]
    assert [c["ok"] for c in checks] == [True] * 7, checks
    assert metrics["passed"] is True and reduced_run["returncode"] == 0
    reached = sum(t["reached"] for t in metrics["targets"])
    assert f"PASS: smoke run, 7/7 checks (the targets apply to the full run: {reached}/3 targets reached" \
        in reduced_run["stdout"]
    assert "A smoke run (`--reduced`)" in (reduced_run["out"] / "report.md").read_text()
