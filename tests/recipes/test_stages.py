"""The stage runner both recipes share (:mod:`preftune.recipes.stages`): stage lines and seconds, kept stages,
run-folder checks, --resume of an earlier run, the atomic metrics file and the report pieces."""

from __future__ import annotations

import json
import math

import pytest

from preftune.recipes import stages
from preftune.recipes.stages import StageRunner


def test_runner_runs_in_order_with_lines_and_seconds():
    lines, seen = [], []
    runner = StageRunner(["one", "two", "three"], echo=lines.append, before=lambda name: seen.append(("before", name)),
                         after=lambda name: seen.append(("after", name, list(runner.stage_seconds()))))
    runner.run("one", "the first", lambda: seen.append("body one"))
    runner.run("two", lambda: "the second, titled late", lambda: seen.append(list(runner.stage_seconds())))
    assert seen == [("before", "one"), "body one", ("after", "one", ["one"]),
                    ("before", "two"), ["one", "two"],  # the running stage's seconds so far
                    ("after", "two", ["one", "two"])]
    assert lines[0].startswith("\n[1/3] one: the first  (elapsed 0s)")
    assert lines[1] == "  one: done in 0s"
    assert lines[2].startswith("\n[2/3] two: the second, titled late  (elapsed ")
    assert list(runner.stage_seconds()) == ["one", "two"] and all(s < 5 for s in runner.stage_seconds().values())
    assert 0 <= runner.total_seconds() < 5


def test_runner_skips_kept_stages_and_counts_their_seconds():
    lines, ran = [], []
    runner = StageRunner(["a", "b", "c"], echo=lines.append, kept={"b": 100.0},
                         before=lambda name: ran.append(("before", name)))
    for name in ("a", "b", "c"):
        runner.run(name, name, lambda name=name: ran.append(name))
    assert ran == [("before", "a"), "a", ("before", "c"), "c"]  # b: neither cleared nor run
    assert lines[2] == "\n[2/3] b: kept from the earlier run (1m40s; --resume)"
    assert list(runner.stage_seconds()) == ["a", "b", "c"] and runner.stage_seconds()["b"] == 100.0
    assert 100 <= runner.total_seconds() < 105


def test_a_failing_stage_records_no_seconds():
    runner, after = StageRunner(["x"], echo=lambda line: None, after=lambda name: after.append(name)), []
    with pytest.raises(KeyboardInterrupt):
        runner.run("x", "x", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert runner.stage_seconds() == {} and after == []


def test_check_run_folder_and_clear_entries(tmp_path):
    (tmp_path / "run" / "m").mkdir(parents=True)
    (tmp_path / "run" / "m" / "w.bin").write_text("x")
    (tmp_path / "run" / "report.md").write_text("x")
    assert stages.check_run_folder(tmp_path / "run", {"m", "report.md"}, "the recipe") == tmp_path / "run"
    stages.clear_entries(tmp_path / "run", ["m", "report.md", "not-there"])
    assert list((tmp_path / "run").iterdir()) == []
    (tmp_path / "run" / "a").write_text("x")
    (tmp_path / "run" / "b").write_text("x")
    with pytest.raises(ValueError, match=r"holds files the recipe did not write \(a, b\)"):
        stages.check_run_folder(tmp_path / "run", {"m"}, "the recipe")
    for name in "cde":
        (tmp_path / "run" / name).write_text("x")
    with pytest.raises(ValueError, match=r"\(a, b, c, \.\.\.\)"):
        stages.check_run_folder(tmp_path / "run", {"m"}, "the recipe")
    with pytest.raises(ValueError, match="is a file"):
        stages.check_run_folder(tmp_path / "run" / "a", {"m"}, "the recipe")
    assert stages.check_run_folder(tmp_path / "new", {"m"}, "the recipe") == tmp_path / "new"  # not created


def test_write_metrics_is_atomic_json_without_nan(tmp_path):
    stages.write_metrics(tmp_path, {"kl": math.nan, "rows": (1, 2)})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"kl": None, "rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_resumed_metrics_keeps_leading_finished_stages(tmp_path):
    entries = {"first": (), "a": ("a.txt",), "b": ("b", "tmp.txt"), "c": ("c.txt",), "last": ()}
    config = {"seed": 0, "threads": 2, "items": (1, 2)}
    assert stages.resumed_metrics(tmp_path, config, entries, ["a", "b", "c"]) == {}  # no earlier run
    earlier = {"config": {"seed": 0, "threads": 4, "items": [1, 2]}, "stage_seconds": {"first": 1, "a": 5, "b": 6,
                                                                                      "c": 7}, "task": {"x": 1}}
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b").mkdir()  # b's tmp.txt is transient; c's entry is missing: c runs again
    kept = stages.resumed_metrics(tmp_path, config, entries, ["a", "b", "c"], free=["threads"],
                                  transient=["tmp.txt"])
    assert kept["resumed"] == ["a", "b"] and kept["stage_seconds"] == {"a": 5, "b": 6} and kept["task"] == {"x": 1}
    # tmp.txt not transient: b's entries are incomplete, so only a is kept
    assert stages.resumed_metrics(tmp_path, config, entries, ["a", "b", "c"], free=["threads"])["resumed"] == ["a"]
    (tmp_path / "a.txt").unlink()  # the first resumable stage's entry gone: nothing is kept
    assert stages.resumed_metrics(tmp_path, config, entries, ["a", "b", "c"], free=["threads"]) == {}
    with pytest.raises(ValueError, match=r"other settings \(threads: 4 now 2\)"):
        stages.resumed_metrics(tmp_path, config, entries, ["a", "b", "c"])
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="not a recipe's metrics.json"):
        stages.resumed_metrics(tmp_path, config, entries, ["a"])


def test_report_pieces():
    samples = [{"prompt": "p1\nmore", "x": "a", "x_score": 0.5}, {"prompt": "p1\nmore", "x": "b", "x_score": 0.1},
               {"prompt": "p2", "x": "c", "x_score": -1.0}]
    firsts = stages.example_samples(samples, 5)
    assert [row["x"] for row in firsts] == ["a", "c"] and stages.example_samples(samples, 1) == firsts[:1]
    assert stages.sample_lines(firsts[:1], [("X", "x")], markdown=True) == ["**p1**", "", "* X (+0.50): a", ""]
    assert stages.sample_lines(firsts[1:], [("X", "x")], markdown=False) == ["  p2", "    X [-1.00] c"]
    assert stages.markdown_table(("a", "b"), [("x|y", "1\n2")]) == ["| a | b |", "|---|---|", "| x\\|y | 1 2 |"]
    assert stages.aligned_rows([("name", "1.0", "2.0")], 6, 5, indent="  ") == ["  name    1.0  2.0"]
    assert stages.interval_text(0.69, 0.63, 0.74) == "0.690 [0.630, 0.740]"
    assert stages.rate_text({"rate": 0.69, "low": 0.63, "high": 0.74, "n": 240}) == "0.690 [0.630, 0.740] (n=240)"
    assert stages.rate_text(None) == "n/a"
    assert stages.verdict_line(False, "1/3 targets", "2m", "r.md") == "FAIL: 1/3 targets; 2m; report: r.md"
