"""``preftune iterate`` (:mod:`preftune.recipes.iterate`): every round's files and the report, ``--resume`` after a
crash in each stage of round 2 (finished stages kept, no judge verdict asked twice, the numbers of an uninterrupted
run; the judge stage's crash is a judge failing on a prompt, which the error names), other settings refused on
resume, ``--stop-when-no-gain``; slow: round 2
beats round 1 on the quickstart's film world, and a ``kill -9`` mid-round resumed from the command line.

The default-suite runs use a random tiny Llama (conftest's) and the rule judge: they check the plumbing, not the
learning, in about a second each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preftune.config.values import ConfigError
from preftune.evaluation.judges.base import CompareResult, Judge, JudgeError
from preftune.evaluation.judges.python import PythonJudge
from preftune.recipes import iterate as iterate_module
from preftune.recipes.iterate import STAGES, run_iterate
from preftune.recipes.iterate_config import IterateConfig, round_prompts
from tests.conftest import BAD, GOOD, TOPICS, rule_pairs, write_jsonl

CALLS: list[tuple[str, str]] = []  # every (prompt, response) the rule judge was asked
FAIL_ON: dict[str, str] = {}  # {"prompt": p}: the judge raises on that prompt
_GOOD, _BAD = set(GOOD), set(BAD)
JUDGE_SPEC = "python:tests.recipes.test_iterate:rule_score"
# fp32 (not --mixed-precision auto): the module-scoped reference run is outside conftest's fp32 fixture
TRAIN = {"batch_size": 8, "max_length": 48, "learning_rate": 1e-3, "logging_steps": 1, "mixed_precision": "no"}


def rule_score(prompt: str, response: str) -> float:
    """The conftest rule (good words +1, bad words -2), counting its calls; raises on ``FAIL_ON["prompt"]``."""
    if FAIL_ON.get("prompt") == prompt:
        raise ConnectionError("the judge server went away")
    CALLS.append((prompt, response))
    words = response.replace(".", " ").split()
    return sum(w in _GOOD for w in words) - 2 * sum(w in _BAD for w in words)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict:
    """The tiny model, 12 training prompts (6 a round) and 8 held-out ones."""
    folder = tmp_path_factory.mktemp("iterate-world")
    prompts = [f"Tell me about the {topic}, part {i}." for i in range(3) for topic in TOPICS]
    (folder / "prompts.txt").write_text("\n".join(prompts[:12]) + "\n")
    (folder / "eval.txt").write_text("\n".join(prompts[12:20]) + "\n")
    return {"model": str(tiny_model_dir), "prompts": str(folder / "prompts.txt"), "eval": str(folder / "eval.txt")}


def config(world: dict, out: Path, **overrides) -> IterateConfig:
    values = dict(model=world["model"], prompts=world["prompts"], eval_prompts=world["eval"],
                  judge=PythonJudge(rule_score, spec=JUDGE_SPEC), output_dir=str(out), rounds=2, samples=4,
                  max_new_tokens=12, kl_samples=1, progress=False,
                  train=TRAIN)
    values.update(overrides)
    return IterateConfig(**values)


def quiet(*_):
    pass


def numbers(out: Path) -> dict:
    """What a run measured (metrics.json without its timings and this run's counts) and wrote per round."""
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics["rounds"]:
        row.pop("stage_seconds")
    kept = {k: v for k, v in metrics.items() if k not in ("seconds", "judge_verdicts_this_run", "settings")}
    files = {f"{d.name}/{name}": (d / name).read_text() for d in sorted(out.glob("round-*"))
             for name in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "eval_samples.jsonl", "round.json")
             if (d / name).exists()}
    return {"metrics": kept, "files": files}


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory) -> dict:
    """One uninterrupted 2-round run: its folder, stage lines, numbers and judge calls."""
    import torch

    out = tmp_path_factory.mktemp("reference") / "run"
    lines: list[str] = []
    CALLS.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the tests' runs (conftest's _threads): the numbers depend on the thread count
    try:
        result = run_iterate(config(world, out), echo=lines.append)
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "lines": lines, "result": result, "numbers": numbers(out), "calls": len(CALLS)}


def test_two_rounds_write_every_file_and_the_report(reference_run, world):
    out, result = reference_run["out"], reference_run["result"]
    assert result.rounds == 2 and not result.stopped
    for n in (1, 2):
        for name in ("samples.jsonl", "scores.jsonl", "judge_cache.jsonl", "pairs.jsonl", "pairs.json", "train.json",
                     "eval_samples.jsonl", "round.json", "stages.json", "model/config.json"):
            assert (out / f"round-{n}" / name).is_file(), (n, name)
        assert list(json.loads((out / f"round-{n}" / "stages.json").read_text())) == list(STAGES)
    assert (out / "round-0" / "round.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row in metrics["rounds"]:
        assert 0 <= row["win_vs_base"]["low"] <= row["win_vs_base"]["rate"] <= row["win_vs_base"]["high"] <= 1
        assert row["win_vs_previous"]["n"] == 8 and row["kl"]["samples"] == 8
        assert row["pairs"]["pairs"] + row["pairs"]["skipped_ties"] + row["pairs"]["skipped_empty"] == 6
        assert set(row["stage_seconds"]) == set(STAGES)
    # round 1's "previous" is the start: its two win rates are one comparison
    assert metrics["rounds"][0]["win_vs_base"] == metrics["rounds"][0]["win_vs_previous"]
    report = (out / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and "win rate vs previous round" in report
    assert (out / "iterate.svg").read_text().startswith("<svg")
    assert "[12/12] report" in "\n".join(reference_run["lines"])
    # fresh prompts each round, none of them held out
    prompts = [{json.loads(line)["prompt"] for line in (out / f"round-{n}" / "samples.jsonl").read_text().splitlines()}
               for n in (1, 2)]
    held_out = set(Path(world["eval"]).read_text().splitlines())
    assert len(prompts[0]) == len(prompts[1]) == 6 and not prompts[0] & prompts[1]
    assert not (prompts[0] | prompts[1]) & held_out


def test_round_prompts_fresh_or_reused():
    prompts = list(range(10))
    assert round_prompts(prompts, 1, 4, False) == [0, 1, 2, 3] and round_prompts(prompts, 2, 4, False) == [4, 5, 6, 7]
    assert round_prompts(prompts, 2, 4, True) == [0, 1, 2, 3]


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, stage: str) -> None:
    """Round 2's ``stage`` runs to its end (its files written), then the process "dies" before the stage is
    marked done."""
    method = {"judge": "score"}.get(stage, stage)  # the judge stage's method is score
    original = getattr(iterate_module._Loop, method)

    def crashing(self, n, *args):
        original(self, n, *args)
        if n == 2:
            raise Crash(f"killed at the end of round 2 {stage}")

    monkeypatch.setattr(iterate_module._Loop, method, crashing)


def crash_mid_training(monkeypatch) -> None:
    """Round 2's training "dies" after writing part of its model folder."""
    import preftune.training.loop as loop

    original = loop.train

    def dies_mid_way(cfg, *args, **kwargs):
        if "round-2" not in cfg.output_dir:
            return original(cfg, *args, **kwargs)
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "model.safetensors").write_text("torn")
        raise Crash("killed mid-training")

    monkeypatch.setattr(loop, "train", dies_mid_way)


def test_resume_after_a_crash_in_each_stage_of_round_2(reference_run, world, tmp_path):
    """One run killed in each stage of round 2 in turn (the judge failing mid-round on a prompt, the training
    mid-way, the others at their very end), resumed each time: every resume keeps the stages finished before,
    the judge is never asked a verdict twice, and the end is the uninterrupted run's numbers and files."""
    out = tmp_path / "run"
    round_2 = Path(world["prompts"]).read_text().splitlines()[6:12]
    CALLS.clear()
    steps = [("sample", lambda mp: crash_after(mp, "sample")), ("judge", lambda mp: FAIL_ON.update(prompt=round_2[3])),
             ("pairs", lambda mp: crash_after(mp, "pairs")), ("train", crash_mid_training),
             ("measure", lambda mp: crash_after(mp, "measure"))]
    for number, (stage, crash) in enumerate(steps):
        lines: list[str] = []
        with pytest.MonkeyPatch.context() as monkeypatch:
            crash(monkeypatch)
            try:
                with pytest.raises((Crash, JudgeError)) as died:
                    run_iterate(config(world, out, resume=number > 0), echo=lines.append)
            finally:
                FAIL_ON.clear()
        text = "\n".join(lines)
        assert text.count("kept from the earlier run") == (0 if number == 0 else 1 + len(STAGES) + number - 1), stage
        done = json.loads((out / "round-2" / "stages.json").read_text())
        assert list(done) == list(STAGES[:number]), stage
        if stage == "judge":
            message = str(died.value)
            assert "\n" not in message and round_2[3] in message and "round 2" in message and "--resume" in message
            assert "ConnectionError: the judge server went away" in message
            cache = (out / "round-2" / "judge_cache.jsonl").read_text().splitlines()
            assert 1 <= len(cache) <= 3 * 4  # the verdicts on the 3 prompts before it, kept
    lines = []
    run_iterate(config(world, out, resume=True), echo=lines.append)
    assert "\n".join(lines).count("kept from the earlier run") == 1 + len(STAGES) + len(STAGES) - 1
    assert len(CALLS) == reference_run["calls"]  # no verdict asked twice
    assert numbers(out) == reference_run["numbers"]


def test_other_settings_on_resume_are_refused_naming_them(reference_run, world):
    out = reference_run["out"]
    before = (out / "settings.json").read_text()
    with pytest.raises(ConfigError) as refused:
        run_iterate(config(world, out, samples=5, resume=True), echo=quiet)
    message = str(refused.value)
    assert "\n" not in message and "samples: 4 then, 5 now" in message
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.001 then, 0.002 now"):
        run_iterate(config(world, out, resume=True, train={**TRAIN, "learning_rate": 2e-3}), echo=quiet)
    with pytest.raises(ValueError, match="add --resume"):
        run_iterate(config(world, out), echo=quiet)
    assert (out / "settings.json").read_text() == before


def test_stop_when_no_gain(world, tmp_path):
    """A random tiny model gains nothing a round: its win rate's interval includes 0.5 and the loop ends."""
    result = run_iterate(config(world, tmp_path / "run", stop_when_no_gain=True), echo=quiet)
    win = result.metrics["rounds"][0]["win_vs_previous"]
    assert win["low"] <= 0.5 <= win["high"]
    assert result.stopped and result.rounds == 1 and not (tmp_path / "run" / "round-2").exists()
    assert "Stopped after round 1" in (tmp_path / "run" / "report.md").read_text()


def test_bad_inputs_are_refused_before_anything_runs(world, tmp_path):
    shared = tmp_path / "eval.txt"
    shared.write_text(Path(world["prompts"]).read_text().splitlines()[0] + "\nSomething else.\n")
    with pytest.raises(ValueError, match="1 of its 2 prompts are also in --prompts"):
        run_iterate(config(world, tmp_path / "a", eval_prompts=str(shared)), echo=quiet)
    with pytest.raises(ValueError, match="has 12 prompts; 3 rounds of 6 fresh prompts need 18"):
        run_iterate(config(world, tmp_path / "b", rounds=3, prompts_per_round=6), echo=quiet)
    with pytest.raises(ConfigError, match="--data: preftune iterate sets it"):
        run_iterate(config(world, tmp_path / "c", train={"data": "x.jsonl"}), echo=quiet)
    with pytest.raises(ConfigError, match="--samples must be >= 2"):
        run_iterate(config(world, tmp_path / "d", samples=1), echo=quiet)
    with pytest.raises(ConfigError, match="--reference must be one of previous, base"):
        run_iterate(config(world, tmp_path / "e", reference="sft"), echo=quiet)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        run_iterate(config(world, tmp_path / "f"), echo=quiet)
    assert not any((tmp_path / name).exists() for name in "abcde")


# ------------------------------------------------------------------------------------- slow: learning, kill -9


def film_world(folder: Path) -> dict:
    """The quickstart's film world, small: a tiny Llama pretrained and SFT'd on generated reviews (both
    sentiments), 642 training prompts and 96 held-out ones (32 unseen films x 3 templates) asked 3 times each."""
    import random

    from preftune.recipes import quickstart_world as films
    from preftune.recipes.quickstart import QuickstartConfig, build_base, train_stage, write_jsonl

    cfg = QuickstartConfig(output_dir=str(folder), hidden=64, layers=2, heads=4, pretrain_texts=3000, sft_rows=1500,
                           progress=False)
    train_films, held_out = films.film_titles(32, seed=0)
    (folder / "data").mkdir(parents=True)
    build_base(cfg, folder, train_films + held_out, train_films)
    write_jsonl(folder / "data" / "sft.jsonl", films.sft_rows(train_films, cfg.sft_rows, seed=2))
    train_stage(cfg, folder / "sft", model=folder / "base", data=folder / "data" / "sft.jsonl", loss="sft",
                learning_rate=cfg.sft_lr, epochs=1.0)
    rng = random.Random(3)
    prompts = list(dict.fromkeys(films.prompt_text(rng.choice(train_films), rng.randrange(3)) for _ in range(2000)))
    held = [films.prompt_text(film, i) for film in held_out for i in range(3) for _ in range(3)]
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in prompts])
    write_jsonl(folder / "eval.jsonl", [{"prompt": p} for p in held])
    return {"model": str(folder / "sft"), "prompts": str(folder / "prompts.jsonl"), "eval": str(folder / "eval.jsonl")}


FILM_TRAIN = {"loss": "dpo", "beta": 0.1, "learning_rate": 5e-4, "epochs": 3.0, "batch_size": 32, "max_length": 64,
              "max_prompt_length": 16, "warmup_ratio": 0.05, "lr_scheduler": "cosine"}


@pytest.mark.slow
def test_round_2_beats_round_1_on_the_film_world(tmp_path):
    """Measured (1 thread, 2-vCPU Xeon): start 0.001, round 1 0.245, round 2 0.428 held-out judge score; round 2
    over round 1 0.611 [0.554, 0.666] (n=288); about 16 s to build the world and 14 s for the two rounds."""
    import torch

    torch.set_num_threads(1)
    paths = film_world(tmp_path / "world")
    cfg = IterateConfig(model=paths["model"], prompts=paths["prompts"], eval_prompts=paths["eval"],
                        judge="python:preftune.recipes.quickstart_world:sentiment_score",
                        output_dir=str(tmp_path / "run"), rounds=2, samples=4, prompts_per_round=300,
                        max_new_tokens=48, kl_samples=1, sample_batch_size=96, progress=False, train=FILM_TRAIN)
    rounds = run_iterate(cfg, echo=quiet).metrics["rounds"]
    assert rounds[1]["judge_score"] > rounds[0]["judge_score"] > 0
    assert rounds[1]["win_vs_previous"]["low"] > 0.5, rounds[1]["win_vs_previous"]
    assert rounds[1]["win_vs_base"]["low"] > 0.5


@pytest.mark.slow
def test_kill_9_mid_round_2_then_resume_from_the_command_line(world, tmp_path):
    """``preftune iterate`` killed with SIGKILL while round 2 trains; the same command plus --resume finishes
    with the numbers of an uninterrupted run."""
    def argv(out: Path) -> list[str]:
        return [sys.executable, "-m", "preftune", "iterate", "--model", world["model"], "--prompts", world["prompts"],
                "--eval-prompts", world["eval"], "--judge", JUDGE_SPEC, "--samples", "3", "--max-new-tokens", "12",
                "--kl-samples", "1", "--batch-size", "8", "--max-length", "48", "--learning-rate", "0.001",
                "--epochs", "10", "--output-dir", str(out), "--no-progress", "-q"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    subprocess.run(argv(tmp_path / "whole"), check=True, cwd=root, env=env, capture_output=True)
    process = subprocess.Popen(argv(tmp_path / "killed"), cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "round-2" / "model").exists() and time.time() < deadline:
        assert process.poll() is None, "the run ended before round 2 trained"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert "train" not in json.loads((tmp_path / "killed" / "round-2" / "stages.json").read_text())
    done = subprocess.run(argv(tmp_path / "killed") + ["--resume"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert numbers(tmp_path / "killed") == numbers(tmp_path / "whole")


def test_the_python_api(world, tmp_path):
    """``preftune.iterate(...)``: the loop's settings and train options as keywords, checked before anything runs."""
    import preftune

    with pytest.raises(ConfigError, match=r"preftune.iterate: unknown option 'learning_rat' \(close matches: "
                                          r"learning_rate"):
        preftune.iterate(world["model"], world["prompts"], world["eval"], JUDGE_SPEC, tmp_path / "a", learning_rat=1)
    with pytest.raises(ConfigError, match="beta"):
        preftune.iterate(world["model"], world["prompts"], world["eval"], JUDGE_SPEC, tmp_path / "b", beta="high")
    pairs = write_jsonl(tmp_path / "held_out_pairs.jsonl", rule_pairs(8, seed=2))
    result = preftune.iterate(world["model"], world["prompts"], world["eval"], JUDGE_SPEC, tmp_path / "c", rounds=2,
                              samples=4, max_new_tokens=12, kl_samples=1, progress=False, eval_pairs=pairs, **TRAIN)
    assert result.rounds == 2 and [r["round"] for r in result.metrics["rounds"]] == [1, 2]
    held_out = result.metrics["rounds"][0]["held_out_pairs"]  # --eval-pairs: preftune eval's numbers vs the start
    assert held_out["preference"]["pairs"] == 8 and 0 <= held_out["preference"]["accuracy"] <= 1
    assert held_out["nll"]["difference"] == pytest.approx(held_out["nll"]["model"] - held_out["nll"]["base"])
    # the start's log-probs of the pairs: computed in round 1, read back in round 2 (the same numbers)
    cache = json.loads((tmp_path / "c" / "round-0" / "base_cache.json").read_text())
    assert [entry["kind"] for entry in cache["entries"].values()] == ["held-out pair log-probs"]
    later = result.metrics["rounds"][1]["held_out_pairs"]
    assert later["nll"]["base"] == held_out["nll"]["base"]
    assert "held-out NLL - start's" in (tmp_path / "c" / "report.md").read_text()
    settings = json.loads((tmp_path / "c" / "settings.json").read_text())
    assert settings["train.learning_rate"] == 1e-3 and settings["judge"] == JUDGE_SPEC
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("options", [{"loss": "plackett_luce"}, {"groups": True, "group_pairs": "best-vs-rest"}],
                         ids=["group-loss", "pair-loss-on-groups"])
def test_training_on_response_groups(options, world, tmp_path):
    """A group loss trains on every response with its score (groups.jsonl); so does a pair loss with --groups."""
    groups = options.pop("groups", False)
    result = run_iterate(config(world, tmp_path / "run", rounds=1, prompts_per_round=6, groups=groups,
                                train={**TRAIN, **options}), echo=quiet)
    counts = result.metrics["rounds"][0]["pairs"]
    assert counts["trained_on"] == "groups" and counts["groups"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "groups.jsonl").read_text().splitlines()]
    assert all(len(r["responses"]) == len(r["scores"]) >= 2 and len(set(r["scores"])) > 1 for r in rows)
    config_yaml = (tmp_path / "run" / "round-1" / "model" / "config.yaml").read_text()
    assert "groups.jsonl" in config_yaml


def test_a_reward_model_trained_into_the_run_folder_judges(world, tmp_path, rule_data):
    """``preftune train --loss reward --output-dir OUT/rm``, then ``--judge reward-model:OUT/rm``: the folder is
    not refused as foreign, and the reward model scores every round."""
    from preftune.api import train

    out = tmp_path / "run"
    train(model=world["model"], data=rule_data["train"], output_dir=out / "rm", loss="reward", max_steps=2,
          batch_size=8, max_length=48, progress=False, mixed_precision="no")
    result = run_iterate(config(world, out, judge=f"reward-model:{out / 'rm'}", rounds=1, prompts_per_round=6),
                         echo=quiet)
    assert result.metrics["rounds"][0]["judge_score"] is not None
    assert len((out / "round-1" / "judge_cache.jsonl").read_text().splitlines()) >= 6
    assert (out / "rm" / "config.json").is_file()


def test_the_judge_cache_keeps_verdicts_and_never_keeps_a_failed_request(tmp_path):
    """An ``openai:``-style comparison whose request failed is a tie with ``errors`` to that judge: the cache
    refuses it (one line naming the prompt), keeps the prompts before it, and asks only the rest next time."""
    from preftune.recipes.iterate_judge import cached_judge

    class Flaky(Judge):
        spec = "openai:http://127.0.0.1:9/v1#judge"

        def __init__(self, fail_on: str | None):
            self.fail_on, self.asked = fail_on, []

        def compare(self, prompts, responses_a, responses_b) -> CompareResult:
            self.asked += list(prompts)
            failed = sum(p == self.fail_on for p in prompts)
            outcomes = [0.5 if p == self.fail_on else float(len(a) > len(b))
                        for p, a, b in zip(prompts, responses_a, responses_b)]
            return CompareResult(outcomes=outcomes, ties=failed, errors=failed)

    prompts, a, b = ["p1", "p1", "p2", "p3"], ["long answer", "x", "yy", "zzz"], ["short", "longer", "y", "z"]
    flaky = Flaky(fail_on="p2")
    with pytest.raises(JudgeError) as failed:
        cached_judge(flaky, tmp_path / "cache.jsonl", "round 1").compare(prompts, a, b)
    message = str(failed.value)
    assert "\n" not in message and "prompt 'p2'" in message and "1 of its 1 comparisons failed" in message
    assert "the 2 verdicts asked before it are kept" in message and flaky.asked == ["p1", "p1", "p2"]
    working = Flaky(fail_on=None)
    result = cached_judge(working, tmp_path / "cache.jsonl", "round 1").compare(prompts, a, b)
    assert working.asked == ["p2", "p3"] and result.outcomes == [1.0, 0.0, 1.0, 1.0]


def test_an_openai_judge_served_locally(world, tmp_path):
    """``--judge openai:URL#MODEL`` (a local llama.cpp / Ollama / vLLM server; here a fake one that prefers the
    longer response), a pairwise judge: round robins and held-out comparisons over HTTP, each verdict asked once
    (a resume asks nothing again); no judge score, win rates only."""
    import threading

    from tests.evaluation.test_judges import FAST, FakeJudgeServer

    server = FakeJudgeServer("longer")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        spec = f"openai:{server.url}#judge?{FAST}"
        result = run_iterate(config(world, tmp_path / "run", judge=spec, rounds=1, prompts_per_round=6), echo=quiet)
        asked = len(server.requests)
        (tmp_path / "run" / "round-1" / "stages.json").write_text(json.dumps({"sample": 0.1}))
        run_iterate(config(world, tmp_path / "run", judge=spec, rounds=1, prompts_per_round=6, resume=True),
                    echo=quiet)
    finally:
        server.shutdown()
        server.server_close()
    row = result.metrics["rounds"][0]
    assert row["judge_score"] is None and row["win_vs_base"]["n"] == 8 and row["pairs"]["prompts"] == 6
    scores = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "scores.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in scores} == {"round-robin points"}
    assert all(sum(s["scores"]) == 4 * 3 / 2 for s in scores)  # 6 games of a point each among 4 responses
    assert "| 1 | n/a |" in (tmp_path / "run" / "report.md").read_text()
    assert 0 < asked <= 2 * (6 * 6 + 2 * 8)  # both orders of each round-robin game and held-out comparison
    assert len(server.requests) == asked  # the resume asked the server nothing


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("no", None)])
def test_sampling_and_measuring_run_in_the_trainings_precision(precision, expected, world, tmp_path, monkeypatch):
    """Every round's sampling, its held-out samples and the KL estimate use the training's --mixed-precision
    (bf16 decoding is the fast path on CPUs that have it), not the weights' fp32."""
    import preftune.evaluation.sampling as sampling

    seen: list = []

    def recorded(function):
        def call(*args, **options):
            seen.append((function.__name__, options.get("compute_dtype")))
            return function(*args, **options)
        return call

    for name in ("sample", "sample_scored", "estimate_kl"):
        monkeypatch.setattr(sampling, name, recorded(getattr(sampling, name)))
    run_iterate(config(world, tmp_path / "run", rounds=1, train={**TRAIN, "mixed_precision": precision}), echo=quiet)
    # the base's held-out samples; round 1's training samples; its held-out samples, which serve the KL too
    # (kl_samples 1 at temperature 1: one sampling, the model's log-probs from the sampler)
    assert sorted(name for name, _ in seen) == ["sample", "sample", "sample_scored"]
    assert all(dtype == expected for _, dtype in seen), seen
    seen.clear()
    run_iterate(config(world, tmp_path / "two", rounds=1, kl_samples=2,
                       train={**TRAIN, "mixed_precision": precision}), echo=quiet)
    # kl_samples 2: the KL draws its own samples (estimate_kl -> sample_scored)
    assert sorted(name for name, _ in seen) == ["estimate_kl", "sample", "sample", "sample", "sample_scored"]
    assert all(dtype == expected for _, dtype in seen), seen


def test_lora_rounds_are_merged_into_plain_model_folders(world, tmp_path):
    """With --lora-r every round trains new adapters on the current policy and merges them: each round's model is
    a plain folder (no adapter files) whose weights moved from the previous round's, and the next round starts
    from it."""
    from safetensors.torch import load_file

    result = run_iterate(config(world, tmp_path / "run", train={**TRAIN, "lora_r": 4, "learning_rate": 1e-2}),
                         echo=quiet)
    assert result.rounds == 2 and all(r["win_vs_base"]["n"] == 8 for r in result.metrics["rounds"])
    weights = [load_file(str(Path(world["model"]) / "model.safetensors"))]
    for n in (1, 2):
        folder = tmp_path / "run" / f"round-{n}" / "model"
        assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
        weights.append(load_file(str(folder / "model.safetensors")))
    name = next(k for k in weights[0] if k.endswith("q_proj.weight"))
    assert all(set(w) == set(weights[0]) for w in weights)  # the same plain tensors, no lora_A / lora_B
    assert not torch.equal(weights[1][name], weights[0][name]) and not torch.equal(weights[2][name], weights[1][name])
