"""Sweeps: the sweep file's checks, choosing the best variant, the report, and a real 3-variant sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import RULE_JUDGE_SOURCE as JUDGE_SOURCE

from preftune.config.train_config import ConfigError
from preftune.evaluation import sweep_report as report
from preftune.evaluation.sweep import best_variant, load_sweep, run_compare, write_report
from preftune.evaluation.sweep_report import read_metrics
from preftune.evaluation.sweep_variant import VARIANT_LOCK
from preftune.training.run_folder import LOCK_NAME

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_sweep(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def assert_png(path):
    """A real, readable PNG image of some size (not an empty figure file)."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


# ----------------------------------------------------------------------------- the sweep file


@pytest.mark.parametrize("change, message", [
    ({"surprise": 1}, "unknown key 'surprise'"),
    ({"base": None}, "'base' is required"),
    ({"variants": []}, "non-empty list"),
    ({"variants": [{"loss": "dpo"}]}, r"variants\[0\] needs a 'name'"),
    ({"variants": [{"name": "a/b"}]}, "names the variant's folder"),
    ({"variants": [{"name": "x"}, {"name": "x"}]}, "'x' is used twice"),
    ({"common": {"data": "other.jsonl"}}, "set by the sweep"),
    ({"common": {"lerning_rate": 1e-6}}, "did you mean 'learning_rate'"),
    ({"eval": {"generate": "many"}}, "generate expects int"),
    ({"eval": {"judges": "x"}}, "unknown option 'judges'"),
    ({"criterion": "loss"}, "not one of win_rate, eval_accuracy"),
    ({"criterion": "win_rate"}, "needs eval: {generate: N, judge: SPEC}"),
    # every variant's options are checked when the file is read, before any variant trains
    ({"variants": [{"name": "betta", "betta": 0.1}]},
     r"sweep.yaml: variant betta: unknown option 'betta' \(did you mean 'beta'\?\)"),
    ({"variants": [{"name": "neg", "beta": -1}]}, r"sweep.yaml: variant neg: --beta must be > 0 \(got -1.0\)"),
    ({"variants": [{"name": "bad-option", "loss": "nope"}]}, "variant bad-option: --loss: 'nope' is not one of"),
    ({"variants": [{"name": "m", "model": "other"}]}, "variant m: 'model' is set by the sweep, not per variant"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, change, message):
    values = {"base": "m", "data": "d.jsonl", "eval_data": "e.jsonl", "output_dir": "out",
              "variants": [{"name": "dpo", "loss": "dpo"}], **change}
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path / "sweep.yaml", **values))


def test_sweep_files_are_read_like_every_config_file(tmp_path):
    """Through config.yaml's reader: a duplicated key and an alias bomb are refused in one line."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: m\ndata: d.jsonl\nbase: other\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:3: .*'base'.*say it once"):
        load_sweep(twice)
    levels = ['&l0 ["lol"' + ',"lol"' * 8 + ']'] + [f"&l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("base: m\nvariants: [" + ", ".join(levels) + "]\n")
    with pytest.raises(ConfigError, match="more than 10,000 values under 'variants'"):
        load_sweep(bomb)


def test_default_criterion_follows_the_eval_settings(tmp_path):
    common = {"base": "m", "data": "d.jsonl", "eval_data": "e.jsonl", "output_dir": "out", "variants": [{"name": "a"}]}
    assert load_sweep(write_sweep(tmp_path / "a.yaml", **common)).criterion == "eval_accuracy"
    judged = load_sweep(write_sweep(tmp_path / "b.yaml", **common, eval={"generate": 4, "judge": "python:m:f"}))
    assert judged.criterion == "win_rate" and judged.isolate


# ----------------------------------------------------------------------------- best variant and report


def record(name, rate=None, low=None, high=None, accuracy=0.5, kl=None, error=None):
    if error:
        return {"name": name, "options": {}, "status": "failed", "error": error, "evaluation": None}
    generation = None
    if kl is not None:
        generation = {"kl": kl, "kl_stderr": 0.1,
                      "win_rate": {"rate": rate, "low": low, "high": high, "n": 16} if rate is not None else None}
    return {"name": name, "options": {"loss": "dpo"}, "status": "done", "error": None, "train_seconds": 1.5,
            "peak_rss_mb": 400.0, "train_rss_mb": 120.0, "peak_gpu_mb": None,
            "evaluation": {"preference": {"accuracy": accuracy, "pairs": 64},
                           "nll": {"model": 2.0, "difference": 0.1}, "generation": generation}}


def test_best_variant_under_each_criterion_and_its_certainty():
    records = [record("a", 0.55, 0.4, 0.7, accuracy=0.9, kl=1.0), record("b", 0.8, 0.6, 0.9, accuracy=0.7, kl=2.0),
               record("broken", error="ValueError: boom")]
    name, text = best_variant(records, "win_rate")
    assert name == "b" and "0.800" in text and "overlaps the runner-up's (a" in text
    name, text = best_variant(records, "eval_accuracy")
    assert name == "a" and "n=64" in text
    clear = [record("a", 0.9, 0.8, 0.97, kl=1.0), record("b", 0.2, 0.1, 0.4, kl=1.0)]
    assert "overlaps" not in best_variant(clear, "win_rate")[1]
    assert best_variant([records[2]], "win_rate") == (None, "No variant has a win_rate value: no best variant.")


def test_report_from_records_has_the_table_and_both_plots(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", base="m", data="d.jsonl", eval_data="e.jsonl",
                                   output_dir=str(tmp_path / "out"), variants=[{"name": "a"}, {"name": "b"}],
                                   eval={"generate": 16, "judge": "python:m:f"}))
    for name, slope in (("a", 1.0), ("b", 2.0)):
        (tmp_path / "out" / name).mkdir(parents=True)
        rows = [{"step": s, "loss": 0.69 - 0.01 * slope * s, "rewards/accuracies": 0.5 + 0.02 * s,
                 "rewards/margins": 0.05 * slope * s} for s in range(1, 11)]
        (tmp_path / "out" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [record("a", 0.6, 0.4, 0.77, kl=1.0), record("b", 0.7, 0.5, 0.85, kl=3.0),
               record("c", error="ConfigError: --loss: 'nope' is not one of dpo, ...")]
    path = write_report(sweep, records)
    text = path.read_text()
    assert "| variant | options | status | held-out acc | win rate vs base [95% CI] |" in text
    assert "| b | loss=dpo | done | 0.500 | 0.700 [0.500, 0.850] | 3.000 ± 0.100 | 2.000 (+0.100) | 1.5 s | " \
           "400 (+120) |" in text
    assert "failed: ConfigError: --loss: 'nope'" in text and "Best variant under win_rate: b" in text
    assert "![curves](curves.png)" in text and "![frontier](frontier.png)" in text
    html_text = path.with_suffix(".html").read_text()
    assert html_text.count("src='data:image/png;base64,") == 2 and "<td>b</td>" in html_text
    for png in ("curves.png", "frontier.png"):
        assert_png(tmp_path / "out" / png)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["best"] == "b" and summary["criterion"] == "win_rate"


def test_frontier_without_kl_is_skipped_with_a_note(tmp_path):
    assert report.frontier_png([{"name": "a", "kl": None, "y": 0.5}], tmp_path / "f.png", "y") is None
    assert report.training_curves_png({"a": [{"step": 0, "eval/loss": 0.7}]}, tmp_path / "c.png") is None


# ----------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_sweep_trains_reports_and_skips_finished_variants(tiny_model_dir, rule_data, tmp_path, monkeypatch):
    """3 variants x 3 steps on the tiny model, each in its own process; a bad reference model fails alone
    (in its own process); the second run retrains nothing that finished. (A bad option is refused before
    any variant runs: test_bad_sweep_files_name_the_problem.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # child processes: generation is faster on one thread
    judge = tmp_path / "rule_judge.py"
    judge.write_text(JUDGE_SOURCE)
    out = tmp_path / "sweep"
    config = write_sweep(
        tmp_path / "sweep.yaml", base=str(tiny_model_dir), data=str(rule_data["train"]),
        eval_data=str(rule_data["eval"]), output_dir=str(out),
        common={"max_steps": 3, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64, "max_prompt_length": 32,
                "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant", "seed": 0},
        variants=[{"name": "dpo", "loss": "dpo", "beta": 0.1}, {"name": "ipo", "loss": "ipo", "beta": 0.5},
                  {"name": "simpo", "loss": "simpo"},
                  {"name": "no-ref", "loss": "dpo", "ref_model": str(tmp_path / "missing-model")}],
        eval={"generate": 4, "judge": f"python:{judge}:rule_score", "max_new_tokens": 6, "max_examples": 16},
        criterion="win_rate")

    path = run_compare(config)
    text = path.read_text()
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["rows"]}
    for name in ("dpo", "ipo", "simpo"):
        row = by_name[name]
        assert row["status"] == "done" and row["steps"] == 3, row.get("error")
        assert (out / name / "done.json").exists() and (out / name / "model.safetensors").exists()
        assert row["peak_rss_mb"] > 50 and row["train_seconds"] > 0
        assert row["evaluation"]["preference"]["pairs"] == 16
        assert row["evaluation"]["generation"]["win_rate"]["n"] == 4
        assert f"| {name} | " in text
    # the base's share of the evaluation: computed by the first variant, read back by the others
    assert by_name["dpo"]["evaluation"]["base_cache"]["stored"] == ["held-out pair log-probs", "samples"]
    for name in ("ipo", "simpo"):
        assert by_name[name]["evaluation"]["base_cache"] == {
            "path": str(out / "base_cache.json"), "reused": ["held-out pair log-probs", "samples"],
            "stored": []}
    assert "model folder not found" in by_name["no-ref"]["error"] and (out / "no-ref" / "run.log").exists()
    assert not (out / "no-ref" / "done.json").exists()
    assert summary["best"] in ("dpo", "ipo", "simpo") and f"Best variant under win_rate: {summary['best']}" in text
    assert "criterion: win_rate: win rate of the variant's samples" in text
    html_text = (out / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 2 and "model folder not found" in html_text
    for png in ("curves.png", "frontier.png"):
        assert_png(out / png)

    # Run again without the variant that needs a process to fail (a failed variant would be retried).
    finished = {name: (out / name / "done.json").stat().st_mtime_ns for name in ("dpo", "ipo", "simpo")}
    metrics = {name: (out / name / "metrics.jsonl").read_text() for name in finished}
    values = yaml.safe_load(config.read_text())
    values["variants"] = [v for v in values["variants"] if v["name"] != "no-ref"]
    run_compare(write_sweep(config, **values))
    again = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(again) == ["dpo", "ipo", "simpo"]
    for name, mtime in finished.items():
        assert again[name]["status"] == "done (earlier run)"
        assert (out / name / "done.json").stat().st_mtime_ns == mtime
        assert (out / name / "metrics.jsonl").read_text() == metrics[name]

    # Change only the eval settings: nothing is trained again, every finished variant is evaluated again.
    values["eval"]["max_examples"] = 8
    run_compare(write_sweep(config, **values))
    third = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    for name in finished:
        assert third[name]["status"] == "done (trained earlier, evaluated again)"
        assert third[name]["evaluation"]["preference"]["pairs"] == 8
        assert (out / name / "metrics.jsonl").read_text() == metrics[name]  # no training ran
        assert json.loads((out / name / "done.json").read_text())["spec"]["eval"]["max_examples"] == 8

    # Change a training setting of one variant: it is trained again into its folder (which holds the
    # earlier model: the sweep overwrites its own variant folders), the others are not.
    values["variants"][0]["beta"] = 0.2
    run_compare(write_sweep(config, **values))
    fourth = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert fourth["dpo"]["status"] == "done" and fourth["dpo"]["steps"] == 3, fourth["dpo"].get("error")
    assert sum(1 for row in read_metrics(out / "dpo" / "metrics.jsonl") if "loss" in row) == 3
    assert fourth["ipo"]["status"] == "done (trained earlier, evaluated again)" or \
        fourth["ipo"]["status"] == "done (earlier run)"


def test_variants_share_one_reference_cache_and_the_second_computes_no_reference_row(tiny_model_dir, rule_data,
                                                                                      tmp_path, monkeypatch):
    """In one process (isolate: false): a reference-free variant makes no cache; of two variants on the same pairs
    and reference, the first computes the reference rows (training batches and the in-loop held-out passes) and
    the second computes none; their losses equal an unshared sweep's (share_ref_cache: false, kept as set)."""
    import preftune.evaluation.sweep_variant as sweep_variant
    from preftune.training.reference import ModelReference

    rows: dict[str, int] = {}
    current = []
    real_train, real_logps = sweep_variant.train, ModelReference.logps

    def counting_train(cfg):
        current.append(Path(cfg.output_dir).parent.name + "/" + Path(cfg.output_dir).name)
        rows.setdefault(current[-1], 0)
        return real_train(cfg)

    def counting_logps(self, batch):
        rows[current[-1]] += batch.num_groups
        return real_logps(self, batch)

    monkeypatch.setattr(sweep_variant, "train", counting_train)
    monkeypatch.setattr(ModelReference, "logps", counting_logps)
    common = {"max_steps": 3, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64, "max_prompt_length": 32,
              "logging_steps": 1, "eval_steps": 2, "warmup_ratio": 0.0, "lr_scheduler": "constant", "seed": 0,
              "max_examples": 64}
    variants = [{"name": "simpo", "loss": "simpo"}, {"name": "dpo", "loss": "dpo", "beta": 0.1},
                {"name": "ipo", "loss": "ipo", "beta": 0.5}]
    sweep = dict(base=str(tiny_model_dir), data=str(rule_data["train"]), eval_data=str(rule_data["eval"]),
                 isolate=False, eval={"max_examples": 8})

    shared = tmp_path / "shared"
    run_compare(write_sweep(tmp_path / "a.yaml", **sweep, output_dir=str(shared), common=common,
                            variants=variants[:1]))
    assert rows == {"shared/simpo": 0} and not (shared / "ref_cache").exists()  # reference-free: no cache
    run_compare(write_sweep(tmp_path / "a.yaml", **sweep, output_dir=str(shared), common=common, variants=variants))
    # each distinct row once: 3 steps of 8 training pairs and the 64 held-out pairs (first in-loop pass only)
    assert rows["shared/dpo"] == 3 * 8 + 64 and rows["shared/ipo"] == 0, rows
    # one table for the training pairs, one for the held-out pairs
    assert [p.name.startswith("shared-") for p in (shared / "ref_cache").iterdir()] == [True, True]
    specs = {v: json.loads((shared / v / "done.json").read_text())["spec"]["train"] for v in ("simpo", "dpo", "ipo")}
    assert not specs["simpo"]["share_ref_cache"] and specs["dpo"]["share_ref_cache"]
    assert specs["ipo"]["ref_cache_dir"] == str(shared / "ref_cache")

    unshared = tmp_path / "unshared"
    run_compare(write_sweep(tmp_path / "b.yaml", **sweep, output_dir=str(unshared),
                            common={**common, "share_ref_cache": False}, variants=variants[1:]))
    assert rows["unshared/dpo"] == rows["unshared/ipo"] == 3 * 8 + 3 * 64  # held-out pairs: steps 0, 2 and 3
    assert not (unshared / "ref_cache").exists()
    for name in ("dpo", "ipo"):
        with_cache, without = (read_metrics(out / name / "metrics.jsonl") for out in (shared, unshared))
        assert len(with_cache) == len(without) and sum("loss" in row for row in without) == 3
        for a, b in zip(with_cache, without):
            for key, value in b.items():
                if isinstance(value, float) and not key.endswith(("seconds", "time", "_s")) and "per_s" not in key:
                    assert abs(a[key] - value) <= 1e-6, (name, key, a[key], value)


def test_train_eval_false_keeps_the_held_out_data_out_of_training(tmp_path):
    """The held-out pairs are evaluated once per variant, after its training, not also inside the loop."""
    from preftune.evaluation.sweep import variant_spec

    common = dict(base="m", data="d.jsonl", eval_data="e.jsonl", output_dir=str(tmp_path / "out"),
                  variants=[{"name": "dpo", "loss": "dpo"}])
    default = load_sweep(write_sweep(tmp_path / "a.yaml", **common))
    assert default.train_eval and variant_spec(default, default.variants[0])["train"]["eval_data"] == "e.jsonl"
    sweep = load_sweep(write_sweep(tmp_path / "b.yaml", **common, train_eval=False))
    spec = variant_spec(sweep, sweep.variants[0])
    assert spec["train"]["eval_data"] is None and spec["eval_data"] == "e.jsonl"


def test_the_sweep_shares_the_reference_only_where_it_can_and_keeps_what_the_file_sets(tmp_path):
    """share_ref_cache into OUTPUT/ref_cache for fixed-reference variants; not for reference-free ones, TR-DPO,
    precompute_ref or several processes; a share_ref_cache or ref_cache_dir the file sets is kept."""
    from preftune.evaluation.sweep import variant_spec

    out = tmp_path / "out"
    sweep = load_sweep(write_sweep(
        tmp_path / "s.yaml", base="m", data="d.jsonl", eval_data="e.jsonl", output_dir=str(out),
        variants=[{"name": "dpo", "loss": "dpo"}, {"name": "orpo", "loss": "orpo"},
                  {"name": "tr-dpo", "loss": "dpo", "sync_ref_model": True},
                  {"name": "pre", "loss": "dpo", "precompute_ref": True},
                  {"name": "two", "loss": "dpo", "num_processes": 2},
                  {"name": "off", "loss": "ipo", "share-ref-cache": False},
                  {"name": "mine", "loss": "dpo", "ref_cache_dir": str(tmp_path / "mine")}]))
    train = {v["name"]: variant_spec(sweep, v)["train"] for v in sweep.variants}
    assert {n for n, t in train.items() if t["share_ref_cache"]} == {"dpo", "mine"}
    assert train["dpo"]["ref_cache_dir"] == str(out / "ref_cache")
    assert train["mine"]["ref_cache_dir"] == str(tmp_path / "mine")
    assert train["off"]["ref_cache_dir"] is None and train["orpo"]["ref_cache_dir"] is None
    for bad, message in (({"loss": "simpo"}, "--share-ref-cache: --loss simpo uses no reference model"),
                         ({"loss": "dpo", "precompute_ref": True}, "--share-ref-cache with --precompute-ref"),
                         ({"loss": "dpo", "sync_ref_model": True}, "--sync-ref-model with --share-ref-cache")):
        wrong = write_sweep(tmp_path / "w.yaml", base="m", data="d.jsonl", eval_data="e.jsonl", output_dir=str(out),
                            variants=[{"name": "v", "share_ref_cache": True, **bad}])
        with pytest.raises(ConfigError, match=message):
            load_sweep(wrong)


def test_variant_records_are_written_atomically_and_errors_read_in_one_line(tmp_path):
    from preftune.evaluation.sweep_variant import error_text, failed_record, write_json

    write_json(tmp_path / "done.json", {"name": "a", "kl": float("nan")})
    assert json.loads((tmp_path / "done.json").read_text()) == {"name": "a", "kl": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json"]  # no temp file left beside it
    assert error_text(ValueError("bad beta\nmore detail")) == "ValueError: bad beta"
    assert error_text(RuntimeError()) == "RuntimeError"
    assert failed_record("a", {"beta": 1}, "boom") == {"name": "a", "options": {"beta": 1}, "status": "failed",
                                                       "error": "boom", "evaluation": None}


# ----------------------------------------------------------------------------- nothing outlives its sweep


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (Linux: a zombie waiting to be reaped counts as ended)."""
    from preftune.common.files import pid_alive

    if not Path("/proc/self/stat").exists():
        return not pid_alive(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.05)
    return value


def check_child_ends_with_parent(parent: subprocess.Popen, ready: Path, started: str) -> None:
    """Once the child has written its pid to ``ready`` (``started``: what that waits for), SIGKILL of
    ``parent`` must end the child within a second. Neither process is left running, pass or fail."""
    try:
        child = int(wait_for(lambda: ready.exists() and ready.read_text(), 60, started))
        assert not gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: gone(child), 1.0, f"process {child} ends with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if ready.exists() and ready.read_text() and not gone(int(ready.read_text())):  # failed: leave nothing
            os.kill(int(ready.read_text()), signal.SIGKILL)


def lock_pid(path: Path) -> int | None:
    """The pid a run lock names (None before it is written)."""
    try:
        return json.loads(path.read_text()).get("pid")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_killing_compare_takes_its_variant_with_it_and_a_rerun_finishes(tiny_model_dir, rule_data, tmp_path):
    """kill -9 of `preftune compare` alone: its variant's process is gone within a second, and running
    compare again trains that variant instead of finding its folder busy. (20-40 s on 2 cores: three
    Python processes start; the two tests below check the same parts in a few seconds.)"""
    out = tmp_path / "sweep"
    config = write_sweep(
        tmp_path / "sweep.yaml", base=str(tiny_model_dir), data=str(rule_data["train"]),
        eval_data=str(rule_data["eval"]), output_dir=str(out), train_eval=False, eval={"max_examples": 8},
        common={"max_steps": 3, "batch_size": 4, "max_length": 64, "max_prompt_length": 32},
        variants=[{"name": "a", "beta": 0.1}])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "compare.log", "w") as log_file:
        parent = subprocess.Popen([sys.executable, "-m", "preftune", "compare", "--config", str(config)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            # the variant's trainer holds the run folder's lock from its start to its final save
            child = wait_for(lambda: lock_pid(out / "a" / LOCK_NAME) or parent.poll() is not None, 120,
                             "the variant's trainer starts")
            assert parent.poll() is None, (tmp_path / "compare.log").read_text()
            assert child != parent.pid and not gone(child)
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
            wait_for(lambda: gone(child), 1.0, f"variant process {child} ends with its parent")
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    assert not (out / "a" / "done.json").exists()

    run_compare(config)  # the folder's owner is dead: its lock is taken over, the variant trained again
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["name"], r["status"], r.get("steps")) for r in rows] == [("a", "done", 3)], rows
    assert (out / "a" / "done.json").exists()


def test_a_live_owner_is_waited_for_then_a_bound_reports_it(tmp_path, monkeypatch):
    """A variant folder held by a live process (an earlier sweep's variant still running) is waited for:
    what it finishes is used; one still held after the bound fails with a line naming its pid."""
    import preftune.evaluation.sweep_variant as sweep_variant
    from preftune.evaluation.sweep import variant_spec

    out = tmp_path / "sweep"
    config = write_sweep(tmp_path / "sweep.yaml", base=str(tmp_path / "no-model"), data="d.jsonl",
                         eval_data="e.jsonl", output_dir=str(out), variants=[{"name": "a"}, {"name": "b"}])
    sweep = load_sweep(config)
    done = {**record("a"), "spec": json.loads(json.dumps(variant_spec(sweep, sweep.variants[0]))), "steps": 3}
    for name in ("a", "b"):
        (out / name).mkdir(parents=True)
    (tmp_path / "done.json").write_text(json.dumps(done))
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, shutil, sys, time
from preftune.evaluation.sweep_variant import VARIANT_LOCK
from preftune.training.run_folder import RunLock
locks = [RunLock.acquire(os.path.join({str(out)!r}, name), VARIANT_LOCK) for name in ("a", "b")]
time.sleep(2)
shutil.copy({str(tmp_path / "done.json")!r}, {str(out / "a" / "done.json")!r})  # an orphan finishing its variant
locks[0].release()
time.sleep(120)
"""])
    try:
        wait_for(lambda: all((out / n / VARIANT_LOCK).exists() and (out / n / VARIANT_LOCK).read_text()
                             for n in ("a", "b")), 60, "the holder takes both folders")
        monkeypatch.setattr(sweep_variant, "BUSY_WAIT_SECONDS", 4.0)
        run_compare(config)
    finally:
        holder.kill()
        holder.wait()
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["a"]["status"] == "done (earlier run)" and rows["a"]["error"] is None
    assert rows["b"]["status"] == "failed"
    assert f"still in use by pid {holder.pid} on " in rows["b"]["error"] and "after waiting 4 s" in rows["b"]["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_kernel_ends_a_variant_process_when_its_parent_dies(tmp_path):
    """Linux: the variant is started with a parent-death signal, so SIGKILL of its parent ends it at once
    (the variant here is a bare sleep: no watcher of its own)."""
    ready = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import pathlib, subprocess, sys, time
from preftune.common.process import parent_death_signal
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=parent_death_signal())
pathlib.Path({str(ready)!r}).write_text(str(child.pid))
time.sleep(120)
"""])
    check_child_ends_with_parent(parent, ready, "the parent starts its variant")


def test_a_variant_process_ends_when_its_parent_dies_where_no_death_signal_is_set(tmp_path):
    """The fallback beside Linux's parent-death signal: the variant watches its parent's pid and exits when
    it is gone (here its parent sets no signal and is killed)."""
    ready = tmp_path / "watching"
    variant = tmp_path / "variant.py"
    variant.write_text(f"""
import os, pathlib, sys, time
from preftune.evaluation.sweep_variant import exit_with_parent
exit_with_parent(int(sys.argv[1]))
pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))
time.sleep(120)
""")
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, {str(variant)!r}, str(os.getpid())])
time.sleep(120)
"""])
    check_child_ends_with_parent(parent, ready, "the variant watches its parent")
