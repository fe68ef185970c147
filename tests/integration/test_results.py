"""Benchmark results are data: every benchmarks/results/<run>/ holds a valid results.json, and
docs/results.md is exactly what benchmarks/results_tables.py generates from them now.

The checker is tested on planted bad folders first (a missing key, a wrong type, no results.json),
so a passing check means something. The writer the benchmark scripts share
(``bench_report.write_results``) is tested to produce records the checker accepts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
PAGE = REPO / "docs" / "results.md"


def load_module(name: str):
    """A module of benchmarks/ (not a package) by its file, with benchmarks/ importable for its siblings."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_module("results_tables")
bench_report = load_module("bench_report")

RUN_FOLDERS = sorted(p for p in RESULTS.iterdir() if p.is_dir())


def valid_record() -> dict:
    """A minimal results.json the checker accepts."""
    return {"name": "a run", "kind": "memory-reference", "command": ["python benchmarks/memory_reference.py"],
            "commit": "abc1234", "date": "2026-01-02",
            "hardware": {"cpu": "some CPU", "flags": ["avx2"], "cores": 2, "gpu": None},
            "versions": {"torch": None}, "notes": None,
            "metrics": {"configurations": [{"configuration": "dpo", "peak_rss_gb": 1.0, "vs_frozen_copy": 1.0}]}}


def plant(root: Path, name: str, record: dict | None) -> Path:
    """A results folder ``root/name`` holding ``record`` as results.json (no file when None)."""
    folder = root / name
    folder.mkdir(parents=True)
    if record is not None:
        (folder / "results.json").write_text(json.dumps(record))
    return folder


def test_there_are_results():
    assert len(RUN_FOLDERS) >= 10


@pytest.mark.parametrize("folder", RUN_FOLDERS, ids=lambda p: p.name)
def test_every_results_folder_has_a_valid_results_json(folder):
    path = folder / "results.json"
    assert path.is_file(), f"{folder.name} has no results.json"
    data = json.loads(path.read_text())
    assert tables.problems(data) == []
    for key, kind in tables.REQUIRED.items():
        assert isinstance(data[key], kind), key
    assert data["command"] and all(isinstance(c, str) for c in data["command"])
    assert set(tables.HARDWARE) <= set(data["hardware"])
    assert data["date"] == folder.name[:10], "a run folder is named after its date"


@pytest.mark.parametrize("folder", RUN_FOLDERS, ids=lambda p: p.name)
def test_commands_use_no_absolute_paths_of_one_machine(folder):
    commands = json.loads((folder / "results.json").read_text())["command"]
    assert not [c for c in commands if "/work/" in c or "/root/" in c or "/tmp/" in c or "/home/" in c]


def test_results_page_is_generated_from_the_results():
    expected = tables.render(tables.load_results(RESULTS))
    assert PAGE.read_text() == expected, "docs/results.md is stale: run python benchmarks/results_tables.py"


@pytest.mark.parametrize("folder", RUN_FOLDERS, ids=lambda p: p.name)
def test_every_result_renders_with_its_kind(folder):
    """Older runs are listed, not tabled, so render each one here: a renderer must read every run of its kind."""
    data = json.loads((folder / "results.json").read_text())
    assert data["kind"] in tables.KINDS, f"unknown kind {data['kind']!r}: add a renderer to results_tables.KINDS"
    parts = tables.KINDS[data["kind"]][2](data)
    assert any("| hardware |" in part for part in parts)


def test_results_page_is_deterministic():
    results = tables.load_results(RESULTS)
    assert tables.render(results) == tables.render(copy.deepcopy(results))


def test_results_page_has_a_section_per_kind_with_hardware_on_every_row():
    results = tables.load_results(RESULTS)
    text = tables.render(results)
    for kind in {data["kind"] for _, data in results}:
        assert f"## {tables.KINDS[kind][0]}" in text
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            assert line.rstrip().endswith("|") and line.count("|") >= 3
    header_rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("| hardware |")]
    assert header_rows, "tables name the hardware in their last column"


def test_checker_fails_on_a_results_json_missing_a_key(tmp_path):
    plant(tmp_path, "2026-01-02-good", valid_record())
    assert len(tables.load_results(tmp_path)) == 1
    broken = valid_record()
    del broken["commit"]
    plant(tmp_path, "2026-01-03-broken", broken)
    with pytest.raises(ValueError, match=r"2026-01-03-broken/results.json: missing key 'commit'"):
        tables.load_results(tmp_path)


def test_checker_fails_on_wrong_types_and_bad_dates():
    record = valid_record()
    record["command"] = "python benchmarks/memory_reference.py"  # a string, not a list
    record["date"] = "Jan 2"
    record["hardware"] = {"cpu": "x", "flags": [], "cores": "two", "gpu": None}
    found = tables.problems(record)
    assert "'command' has type str" in found
    assert "'date' is 'Jan 2', not YYYY-MM-DD" in found
    assert any("'cores'" in p for p in found)
    assert tables.problems([]) == ["not a JSON object"]


def test_checker_fails_on_a_folder_without_results_json(tmp_path):
    plant(tmp_path, "2026-01-02-empty", None)
    with pytest.raises(ValueError, match="2026-01-02-empty: no results.json"):
        tables.load_results(tmp_path)


def test_check_flag_fails_on_a_stale_page(tmp_path):
    plant(tmp_path / "results", "2026-01-02-run", valid_record())
    page = tmp_path / "results.md"
    args = ["--results", str(tmp_path / "results"), "--out", str(page)]
    assert tables.main(args + ["--check"]) == 1  # no page yet
    assert tables.main(args) == 0
    assert tables.main(args + ["--check"]) == 0
    changed = valid_record()
    changed["metrics"]["configurations"][0]["peak_rss_gb"] = 2.0
    (tmp_path / "results" / "2026-01-02-run" / "results.json").write_text(json.dumps(changed))
    assert tables.main(args + ["--check"]) == 1


def test_latest_run_is_the_newest_complete_one(tmp_path):
    older, newer, partial = valid_record(), valid_record(), valid_record()
    older["name"], newer["name"], partial["name"] = "older run", "newer run", "stopped run"
    newer["date"] = partial["date"] = "2026-02-01"
    partial["partial"] = True
    for name, record in [("2026-01-02-a", older), ("2026-02-01-b", newer), ("2026-02-01-c", partial)]:
        plant(tmp_path, name, record)
    text = tables.render(tables.load_results(tmp_path))
    assert "Latest: **newer run**" in text
    assert "- 2026-02-01: stopped run" in text and "- 2026-01-02: older run" in text


def test_shared_writer_produces_a_valid_record(tmp_path):
    argv = [str(BENCHMARKS / "memory_reference.py"), "--out", str(REPO / "runs" / "x"), "--results-dir", "/tmp/r"]
    path = bench_report.write_results(tmp_path / "run", "a run", "memory-reference",
                                      valid_record()["metrics"], argv=argv, notes="planted")
    data = json.loads(path.read_text())
    assert tables.problems(data) == []
    assert data["command"] == ["python benchmarks/memory_reference.py --out runs/x"]
    assert data["versions"]["python"] and "torch" in data["versions"]
    assert data["hardware"]["cores"] and isinstance(data["hardware"]["flags"], list)


def test_cpu_info_reads_model_flags_and_keeps_the_relevant_ones():
    text = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 avx512_bf16 amx_tile\n"
    info = bench_report.cpu_info(text)
    assert info["cpu"] == "Some CPU @ 2.0GHz"
    assert info["flags"] == ["avx2", "avx512_bf16", "amx_tile"]


def test_memory_and_eval_stage_scripts_write_records_their_tables_read(tmp_path):
    from types import SimpleNamespace

    memory = load_module("memory_reference")
    args = SimpleNamespace(results_dir=tmp_path / "memory", hidden=64, layers=1, steps=1, batch_size=1, threads=1)
    memory.write_results(args, 1000, [("dpo", {"peak_rss_gb": 2.0, "seconds": 1.0}),
                                      ("orpo", {"peak_rss_gb": 1.5, "seconds": 1.0})])
    data = json.loads((tmp_path / "memory" / "results.json").read_text())
    assert tables.problems(data) == [] and data["kind"] == "memory-reference"
    assert "| orpo | 1.50 | 0.75x |" in tables.memory_tables(data)[0]

    stages = load_module("eval_stages")
    args = SimpleNamespace(results_dir=tmp_path / "eval", label="after", generate=8, batch_size=4, threads=1)
    out = {"seconds": {"NLL": 1.5, "total": 2.0}, "accuracy": 0.5, "win_rate": {"rate": 0.75}, "kl": 1.0}
    stages.write_results(args, out)
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert tables.problems(data) == [] and data["kind"] == "eval-stages"
    assert "| NLL | 1.5 |" in tables.eval_stages_tables(data)[0]


def test_recipe_tables_read_the_recipes_own_metrics_as_the_stored_form():
    """The real recipe's metrics.json (task A's KL as {mean, stderr}, accuracies beside their intervals, the task's
    DPO under "dpo") renders the same tables as the flattened form older results.json files hold."""
    folder = RESULTS / "2026-12-05-real-recipe-full-continued"
    stored = json.loads((folder / "results.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    native = copy.deepcopy(stored)
    native["metrics"].update(task_a=metrics["task_a"], task_b=metrics["task_b"])
    assert isinstance(native["metrics"]["task_a"]["kl"], dict) and "dpo_whole_part" not in native["metrics"]["task_b"]
    assert tables.recipe_tables(native) == tables.recipe_tables(stored)
    rows = "\n".join(tables.recipe_tables(native))
    assert "| **dpo (whole part)**, the task's result | 184 | 0.629 [0.566, 0.688] |" in rows
    assert "| reward model |  | 0.633 [0.571, 0.692] |" in rows
