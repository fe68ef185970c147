"""Nothing lost: atomic final saves, re-runs that never mix, resume only of the run that wrote a checkpoint,
collapse detection, full disks, huge records, torn metrics, clear load errors, Ctrl-C and plain progress lines.

Runs use a tiny Llama (hidden 32) on 24 synthetic rule pairs in batches of 4, CPU, one thread; each
finding of issue 16 has its test, which fails on the code before the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import rule_pairs, train_argv, write_jsonl
from safetensors.torch import load_file

from preftune.cli.main import main
from preftune.common.files import DiskFullError
from preftune.config.train_config import TrainConfig
from preftune.model import logprobs
from preftune.model.logprobs import LogpOutput
from preftune.model.tiny import tiny_model
from preftune.training import checkpoint as ckpt
from preftune.training import final_model, run_folder
from preftune.training.divergence import TrainingDiverged
from preftune.training.loop import train
from preftune.training.signals import StopOnSignal, TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("safety")
    model_dir = folder / "model"
    tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0, hidden=32, heads=2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "train": write_jsonl(folder / "train.jsonl", rule_pairs(24, seed=3)),
            "other": write_jsonl(folder / "other.jsonl", rule_pairs(24, seed=11)), "root": folder}


def options(setup, out, **overrides) -> dict:
    values = dict(model=str(setup["model"]), data=str(setup["train"]), output_dir=str(out), loss="dpo", beta=0.1,
                  learning_rate=3e-3, batch_size=4, max_steps=2, max_length=48, max_prompt_length=24,
                  lr_scheduler="constant", warmup_steps=0, logging_steps=1, save_total_limit=0, seed=0,
                  progress=False, mixed_precision="no")  # fp32 in every process, whatever the CPU
    values.update(overrides)
    return values


def config(setup, out, **overrides) -> TrainConfig:
    return TrainConfig(**options(setup, out, **overrides))


def argv(setup, out, **overrides) -> list[str]:
    return train_argv(options(setup, out, **overrides))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def on_policy_call(monkeypatch, action, calls) -> None:
    """Run ``action(n, output)`` -> output on the policy forward's n-th call (grad on) for n in ``calls``."""
    original, count = logprobs.batch_logps, {"n": 0}

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] in calls:
                out = action(count["n"], out)
        return out

    monkeypatch.setattr(logprobs, "batch_logps", wrapper)


def send(signum):
    def action(n, out):
        signal.raise_signal(signum)
        return out
    return action


def nan_logps(n, out):
    return LogpOutput(out.logps * float("nan"), out.counts, out.token_logps)


def zero_gradient(n, out):
    """The same log-probs, no gradient through them: a finite loss and an all-zero gradient."""
    return LogpOutput(out.logps.detach() + 0 * out.logps, out.counts, out.token_logps)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so no clean-up code runs."""


def crash_at(monkeypatch, stage: str) -> None:
    def crash(name, step):
        if name == stage:
            raise Killed

    monkeypatch.setattr(ckpt, "_crash_point", crash)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_cli(setup, out, slow: float = 0.3, extra_env=None, **overrides) -> subprocess.Popen:
    """``preftune train`` in a subprocess whose policy forwards each take ``slow`` s longer."""
    script = ("import sys, time\nimport preftune.model.logprobs as lp\nfrom preftune.cli.main import main\nfast = lp.batch_logps\n"
              f"lp.batch_logps = lambda *a, **k: (time.sleep({slow}), fast(*a, **k))[1]\nsys.exit(main(sys.argv[1:]))\n")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    err = open(out.parent / f"{out.name}.stderr.txt", "w")
    return subprocess.Popen([sys.executable, "-c", script, *argv(setup, out, **overrides)], env=env,
                            stdout=subprocess.DEVNULL, stderr=err, cwd=out.parent)


def wait_for_checkpoint(proc, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out.parent / f"{out.name}.stderr.txt").read_text()[-2000:]
        if ckpt.list_checkpoints(out):
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint written in time")


# ------------------------------------------------------------------------------------------------
# 1. the final model is written atomically
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> dict:
    """A finished 2-step run with a checkpoint at step 2: its folder and final weights."""
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:  # conftest's fp32 rule (a function fixture) comes later
            import preftune.model.precision

            patch.setattr(preftune.model.precision, "_host_has_fast_bf16", lambda: False)
            train(config(setup, out, save_steps=2))
    finally:
        torch.set_num_threads(previous)
    return {"out": out, "weights": weights(out)}


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    return out


@pytest.mark.parametrize("stage", final_model.FINAL_CRASH_STAGES)
def test_a_final_save_killed_at_any_stage_leaves_the_previous_model(setup, finished, tmp_path, monkeypatch, stage):
    """Resume the finished run to step 4 and kill its final save: before the moves the folder still
    holds the step-2 model (loadable, equal); mid-move it holds no config.json (not loadable, no
    mix) until the next start puts the step-2 model back; after the moves the step-4 model is whole."""
    from transformers import AutoModelForCausalLM

    out = copy_run(finished, tmp_path)
    crash_at(monkeypatch, stage)
    with pytest.raises(Killed):
        train(config(setup, out, save_steps=2, max_steps=4, resume_from="latest"))
    if stage == "final_mid_swap":
        assert not (out / "config.json").exists()  # a loader finds no model here, never a mixed one
        final_model.recover_final_save(out)  # what the next run's start does
    AutoModelForCausalLM.from_pretrained(out)  # loadable
    assert same(weights(out), finished["weights"]) == (stage != "final_after_swap")  # the previous, or the new


def test_kill_9_during_the_final_save_then_the_next_start_restores_the_model(setup, finished, tmp_path, caplog):
    """A real SIGKILL (the test hook) between the old model's files moving out and the new ones in."""
    out = copy_run(finished, tmp_path)
    proc = start_cli(setup, out, slow=0.0, extra_env={ckpt.CRASH_HOOK_ENV: "final_mid_swap"}, save_steps=2,
                     max_steps=4, resume_from="latest")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert not (out / "config.json").exists() and (out / run_folder.LOCK_NAME).exists()
    with caplog.at_level("WARNING", logger="preftune"):
        train(config(setup, out, save_steps=2, max_steps=4, resume_from="latest"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("taking over the lock of an earlier run" in m and f"pid {proc.pid}" in m for m in messages), messages
    assert any("interrupted final save was undone" in m for m in messages), messages
    assert not same(weights(out), finished["weights"])  # now the step-4 model, written whole
    assert not [p.name for p in out.iterdir() if p.name.startswith((".final", ".preftune"))]


# ------------------------------------------------------------------------------------------------
# 2. re-runs never mix results; one trainer per folder
# ------------------------------------------------------------------------------------------------

def test_a_rerun_into_a_finished_folder_is_refused_in_one_line(setup, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    assert main(argv(setup, out)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert "already holds a finished run" in lines[0]
    for choice in ("--resume-from latest", "--overwrite-output-dir", "another --output-dir"):
        assert choice in lines[0], lines[0]
    assert (out / "metrics.jsonl").read_text() == before and same(weights(out), finished["weights"])

    assert main(argv(setup, out, overwrite_output_dir=True, max_steps=1)) == 0  # replaces it, nothing mixed
    assert [r["step"] for r in metric_rows(out)] == [1]
    assert not ckpt.list_checkpoints(out) and not same(weights(out), finished["weights"])


def test_two_trainers_on_one_folder_the_second_is_refused_then_a_killed_ones_lock_is_taken_over(
        setup, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    proc = start_cli(setup, out, max_steps=40, save_steps=1)
    try:
        wait_for_checkpoint(proc, out)
        lock = json.loads((out / run_folder.LOCK_NAME).read_text())
        assert lock["pid"] == proc.pid and lock["run_id"] and lock["host"] and lock["started"]
        assert main(argv(setup, out, max_steps=40, save_steps=1, resume_from="latest")) == 1
        lines = error_lines(capsys)
        assert len(lines) == 1 and "in use by a running preftune run" in lines[0] and f"pid {proc.pid}" in lines[0]
    finally:
        proc.kill()
        proc.wait()
    with caplog.at_level("WARNING", logger="preftune"):
        train(config(setup, out, max_steps=40, save_steps=1, resume_from="latest"))
    assert any("taking over the lock" in r.getMessage() and "that process is gone" in r.getMessage()
               for r in caplog.records)
    assert not (out / run_folder.LOCK_NAME).exists()  # released at the end


def test_a_checkpoint_save_removes_only_temp_folders_of_processes_that_are_gone(tmp_path):
    root = ckpt.checkpoint_dir(tmp_path)
    live = root / f"step-000009{ckpt.TMP_MARK}{os.getppid()}"  # our parent: alive
    gone = root / f"step-000007{ckpt.TMP_MARK}{dead_pid()}"
    for folder in (live, gone):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, dict(module.named_parameters()), optimizer, scheduler, {"step": 1}, keep=2)
    assert live.exists() and not gone.exists()


# ------------------------------------------------------------------------------------------------
# 3. resume continues only the run that wrote the checkpoint
# ------------------------------------------------------------------------------------------------

def test_latest_never_resumes_an_earlier_runs_checkpoint(setup, tmp_path, monkeypatch, caplog):
    """The issue's probe: run A saves steps 8 and 12; run B, on other data in the same folder, stops at
    11. `latest` resumes B's step 11, even with A's step 12 (copied back) in the folder; A's checkpoint
    given by path is refused: it was trained on other data."""
    out = tmp_path / "run"
    common = dict(max_steps=12, save_steps=4, save_total_limit=2, batch_size=2)
    train(config(setup, out, **common))
    a_run = ckpt.checkpoint_run(ckpt.checkpoint_path(out, 12))
    kept_a = tmp_path / "a-step-12"
    shutil.copytree(ckpt.checkpoint_path(out, 12), kept_a)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(out)] == [8, 12]

    on_policy_call(monkeypatch, send(signal.SIGINT), {11})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(setup, out, data=str(setup["other"]), overwrite_output_dir=True, **{**common, "save_steps": 1}))
    assert stopped.value.step == 11
    shutil.copytree(kept_a, ckpt.checkpoint_path(out, 12))  # A's newer checkpoint back in the folder
    b_run = json.loads((out / "run.json").read_text())["run_id"]
    assert b_run != a_run
    assert ckpt.resolve_resume("latest", out, run_id=b_run) == ckpt.checkpoint_path(out, 11)

    with pytest.raises(ValueError, match="was trained on other data"):
        train(config(setup, out, data=str(setup["other"]), resume_from=str(kept_a), **common))
    with caplog.at_level("INFO", logger="preftune"):
        result = train(config(setup, out, data=str(setup["other"]), resume_from="latest", **common))
    assert result.steps == 12
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed run")]
    assert resumed == [f"resumed run {b_run} from {ckpt.checkpoint_path(out, 11)} at step 11"]


def test_resume_compares_the_datas_content_not_its_path(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, save_steps=1))
    moved = shutil.copy(setup["train"], tmp_path / "moved.jsonl")  # same content, other path: fine
    train(config(setup, out, save_steps=1, max_steps=3, data=str(moved), resume_from="latest"))
    Path(moved).write_text(Path(setup["other"]).read_text())  # same path, other content: refused
    with pytest.raises(ValueError, match="trained on other data"):
        train(config(setup, out, save_steps=1, max_steps=4, data=str(moved), resume_from="latest"))


# ------------------------------------------------------------------------------------------------
# 4. divergence: collapse detected, a good checkpoint named, the learning rate changeable on resume
# ------------------------------------------------------------------------------------------------

def test_learning_rate_1e3_stops_at_once_instead_of_exiting_0_with_a_destroyed_model(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(setup, out, learning_rate=1e3, max_steps=30, save_steps=1)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert "the trained weights exploded at step 1" in lines[0] and "No kept checkpoint predates" in lines[0]
    assert not (out / "model.safetensors").exists() and not ckpt.list_checkpoints(out)


def test_a_collapse_names_the_checkpoint_before_it_and_a_resume_may_lower_the_learning_rate(
        setup, tmp_path, caplog):
    """Steps 1-4 at 3e-3 (checkpoints 3, 4), then resumed at 1e3: step 5 explodes. The message names
    step 4 and the command to go on at a lower rate, which then works and says the rate changed."""
    out = tmp_path / "run"
    train(config(setup, out, max_steps=4, save_steps=1, save_total_limit=2))
    with pytest.raises(TrainingDiverged) as diverged:
        train(config(setup, out, max_steps=8, save_steps=1, save_total_limit=2, learning_rate=1e3,
                     resume_from="latest"))
    good = ckpt.checkpoint_path(out, 4)
    assert "exploded at step 5" in str(diverged.value) and f"checkpoint {good} (step 4" in str(diverged.value)
    assert f"--resume-from {good} --learning-rate 100" in str(diverged.value)
    with caplog.at_level("INFO", logger="preftune"):
        train(config(setup, out, max_steps=6, save_steps=1, save_total_limit=2, learning_rate=1e-4,
                     resume_from=str(good)))
    assert any("learning rate changed from 0.003 to 0.0001 on resume" in r.getMessage() for r in caplog.records)
    assert [r["learning_rate"] for r in metric_rows(out) if r["step"] in (5, 6)] == [1e-4, 1e-4]


def test_a_resume_without_learning_rate_keeps_the_checkpoints_rate(setup, tmp_path, capsys, caplog):
    """Steps 1-2 at 3e-3 from the command line, then `--resume-from latest` on the command line without
    --learning-rate: the run goes on at 3e-3 (not the 1e-6 default) and says where the rate came from."""
    out = tmp_path / "run"
    assert main(argv(setup, out, max_steps=2, save_steps=1)) == 0
    args = [a for a in argv(setup, out, max_steps=4, save_steps=1, resume_from="latest")]
    at = args.index("--learning-rate")
    del args[at:at + 2]
    with caplog.at_level("INFO", logger="preftune"):
        assert main(args) == 0
    assert any("learning rate 0.003 from the checkpoint" in r.getMessage() for r in caplog.records)
    assert [r["learning_rate"] for r in metric_rows(out) if r["step"] in (3, 4)] == [3e-3, 3e-3]


def test_all_zero_gradients_stop_the_run_naming_a_checkpoint_from_before_they_began(setup, tmp_path, monkeypatch):
    """Zero gradients from step 4 on, --max-bad-steps 3: stop after step 6; checkpoints 4 and 5 (written
    during the streak, whose weights already gave zero gradients from step 4) are not named, step 2 is."""
    on_policy_call(monkeypatch, zero_gradient, set(range(4, 100)))
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as diverged:
        train(config(setup, out, max_steps=20, save_steps=1, save_total_limit=2, max_bad_steps=3))
    message = str(diverged.value)
    assert "3 consecutive steps with an all-zero gradient (steps 4-6)" in message, message
    assert f"checkpoint {ckpt.checkpoint_path(out, 2)} (step 2" in message
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(out)] == [2, 3, 4, 5]  # streak: none removed


def test_a_run_whose_every_step_was_skipped_exits_non_zero(setup, tmp_path, monkeypatch, capsys):
    on_policy_call(monkeypatch, nan_logps, set(range(1, 100)))
    out = tmp_path / "run"
    assert main(argv(setup, out, max_steps=3, max_bad_steps=5)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "every one of the 3 steps was skipped" in lines[0], lines
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()


def test_summary_json_holds_no_nan(setup, tmp_path, monkeypatch):
    """The last step skipped: the last metrics row's loss is NaN; summary.json says null, strict JSON."""
    on_policy_call(monkeypatch, nan_logps, {3})
    out = tmp_path / "run"
    train(config(setup, out, max_steps=3))

    def refuse(constant):
        raise ValueError(f"{constant} in summary.json")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["final"]["loss"] is None and summary["final"]["step"] == 3


# ------------------------------------------------------------------------------------------------
# 5. a full disk: one line, nothing torn, nothing lost
# ------------------------------------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_is_one_line_naming_the_path_and_the_space(setup, tmp_path, monkeypatch,
                                                                                  capsys):
    import safetensors.torch

    out = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    assert main(argv(setup, out, save_steps=1)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert f"no space left on device writing {ckpt.checkpoint_dir(out)}/step-000001.tmp-" in lines[0]
    assert "needs about" in lines[0] and "B free); no earlier checkpoint is kept" in lines[0]
    assert not list(ckpt.checkpoint_dir(out).iterdir())  # the partial checkpoint was removed


def test_a_safetensors_io_error_counts_as_disk_full(setup, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def storage_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", storage_full)
    assert main(argv(setup, tmp_path / "run", save_steps=1)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no space left on device writing" in lines[0] and "SafetensorError" not in lines[0]


def test_disk_full_in_the_final_save_keeps_the_trained_model_elsewhere(setup, finished, tmp_path, monkeypatch,
                                                                       final_model):
    """Nothing in OUTPUT is replaced (the step-2 model stays); the step-4 model is written to the
    temp folder instead (another disk, with room), and the message says where."""
    import tempfile

    from transformers import PreTrainedModel

    out = copy_run(finished, tmp_path)
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    original = PreTrainedModel.save_pretrained

    def full_in_out(self, folder, *args, **kwargs):
        if Path(folder).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_in_out)
    with pytest.raises(DiskFullError) as full:
        train(config(setup, out, save_steps=3, max_steps=4, resume_from="latest"))
    message = str(full.value)
    assert message.startswith(f"no space left on device writing {out}/.final.tmp-") and f"nothing in {out}" in message
    kept = Path(message.split("saved to ")[1].split(" instead")[0])
    assert kept.parent == spare
    assert same(weights(out), finished["weights"])  # the previous model, untouched
    in_memory = {k: v for k, v in final_model["model"].state_dict().items()}
    assert same(weights(kept), {k: in_memory[k] for k in weights(kept)})
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]


def test_disk_full_writing_config_yaml_leaves_no_empty_file(setup, tmp_path, monkeypatch, capsys):
    original = Path.write_text

    def empty_then_full(self, *args, **kwargs):
        if "config.yaml" in self.name:
            original(self, "")  # what a full disk leaves: the file, without its content
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", empty_then_full)
    out = tmp_path / "run"
    assert main(argv(setup, out)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and f"no space left on device writing {out / 'config.yaml'}" in lines[0], lines
    assert not [p.name for p in out.iterdir() if "config.yaml" in p.name]


def test_a_reference_cache_that_cannot_be_written_is_still_used(setup, tmp_path, monkeypatch, caplog):
    import safetensors.torch

    original = safetensors.torch.save_file

    def full_for_the_cache(tensors, filename, *args, **kwargs):
        if "ref_cache" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_cache)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="preftune"):
        train(config(setup, out, precompute_ref=True))
    warning = [r.getMessage() for r in caplog.records if "reference cache not written" in r.getMessage()]
    assert len(warning) == 1 and "no space left on device writing" in warning[0] and "needs about" in warning[0]
    assert json.loads((out / "summary.json").read_text())["reference"] == "precomputed cache"
    assert not list((out / "ref_cache").glob("*"))


# ------------------------------------------------------------------------------------------------
# 6. vocabulary and huge records
# ------------------------------------------------------------------------------------------------

def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load(setup, tmp_path, tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(["zzqxword"])
    model_dir = tmp_path / "model"
    shutil.copytree(setup["model"], model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"chosen": f"{r['chosen'][:-1]} zzqxword.", "rejected": r["rejected"]} for r in rule_pairs(8, seed=1)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens but the model's embedding only \d+ rows: "
                                         r".*pairs.jsonl:1 has token id \d+, which has no embedding"):
        train(config(setup, tmp_path / "run", model=str(model_dir), data=str(data)))


def test_a_huge_record_is_cut_before_tokenizing_and_gives_the_same_ids(tiny_tokenizer, monkeypatch):
    from preftune.data import tokenize
    from preftune.data.records import Example

    calls: list[int] = []
    cls = type(tiny_tokenizer)
    original = cls.__call__

    def spy(self, text, *args, **kwargs):
        calls.append(max(len(t) for t in text) if isinstance(text, list) else len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    words = " ".join(["kind calm clear gentle honest warm bright fair"] * 40)  # ~2 KB
    huge = Example(kind="pair", prompt="Human: " + words * 1000 + "\n\nAssistant:",  # ~2 MB each
                   chosen=" The river is " + words * 1000, rejected=" The river is cold " + words * 1000)
    started = time.perf_counter()
    fast = tokenize.tokenize_example(tiny_tokenizer, huge, 0, max_length=64, max_prompt_length=32)
    seconds = time.perf_counter() - started
    # prompt + completion, each cut to 64 x CHARS_PER_TOKEN_BOUND characters (from 2 MB)
    assert max(calls) <= 2 * 64 * tokenize.CHARS_PER_TOKEN_BOUND and seconds < 2.0, (max(calls), seconds)

    # The same ids as tokenizing everything, then truncating (a 40 KB version, cheap to tokenize whole).
    smaller = Example(kind="pair", prompt="Human: " + words * 20 + "\n\nAssistant:", chosen=" The river is " + words * 20,
                      rejected=" The river is cold " + words * 20)
    bounded = tokenize.tokenize_example(tiny_tokenizer, smaller, 0, max_length=64, max_prompt_length=32)
    monkeypatch.setattr(tokenize, "CHARS_PER_TOKEN_BOUND", None)
    whole = tokenize.tokenize_example(tiny_tokenizer, smaller, 0, max_length=64, max_prompt_length=32)
    assert (bounded.prompt_ids, bounded.completions) == (whole.prompt_ids, whole.completions)
    assert (fast.prompt_ids, fast.completions) == (whole.prompt_ids, whole.completions)  # same text at the cut ends
    # A bound too tight to be sure (1 character per token) falls back to the whole text: still the same ids.
    monkeypatch.setattr(tokenize, "CHARS_PER_TOKEN_BOUND", 1)
    tight = tokenize.tokenize_example(tiny_tokenizer, smaller, 0, max_length=64, max_prompt_length=32)
    assert (tight.prompt_ids, tight.completions) == (whole.prompt_ids, whole.completions)


def test_the_batched_path_bounds_huge_records_too(tiny_tokenizer, monkeypatch):
    from preftune.data import tokenize
    from preftune.data.report import DataReport
    from preftune.data.records import Example

    words = " ".join(["kind calm clear gentle honest warm bright fair"] * 40)
    rows = [Example(kind="sft", prompt="Write:" + words * 100, completion=" " + words * 100) for _ in range(3)]
    started = time.perf_counter()
    bounded = tokenize.tokenize_examples(tiny_tokenizer, rows, 64, 32, report=DataReport("x", "sft"), on_bad=print)
    assert time.perf_counter() - started < 2.0
    monkeypatch.setattr(tokenize, "CHARS_PER_TOKEN_BOUND", None)
    whole = tokenize.tokenize_examples(tiny_tokenizer, rows, 64, 32, report=DataReport("x", "sft"), on_bad=print)
    assert [(e.prompt_ids, e.completions) for e in bounded] == [(e.prompt_ids, e.completions) for e in whole]


# ------------------------------------------------------------------------------------------------
# 7. a torn metrics line; 8. clear errors, Ctrl-C
# ------------------------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_repaired_on_resume(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, save_steps=2))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "epoch": 0.5, "lo')  # killed mid-write
    train(config(setup, out, save_steps=2, max_steps=3, resume_from="latest"))
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3]  # every line parses; step 3 once


@pytest.fixture
def two_checkpoints(setup, tmp_path) -> Path:
    out = tmp_path / "run"
    train(config(setup, out, save_steps=1))
    return out


def test_a_corrupt_newest_checkpoint_names_the_previous_one(setup, two_checkpoints):
    out = two_checkpoints
    (ckpt.checkpoint_path(out, 2) / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError) as error:
        train(config(setup, out, save_steps=1, max_steps=3, resume_from="latest"))
    previous = ckpt.checkpoint_path(out, 1)
    assert "model.safetensors is truncated or corrupt" in str(error.value)
    assert str(error.value).endswith(f"the previous checkpoint of its run is step-000001: --resume-from {previous}")


def test_a_truncated_optimizer_state_is_named_as_such(two_checkpoints):
    path = ckpt.checkpoint_path(two_checkpoints, 2) / "optimizer.pt"
    data = path.read_bytes()
    for size in range(len(data) - 1, 0, -97):  # a cut where torch says only "[Errno 22] Invalid argument"
        path.write_bytes(data[:size])
        try:
            torch.load(path, weights_only=True)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                break
        except Exception:
            continue
    else:
        pytest.skip("no truncation point gives EINVAL with this torch")
    with pytest.raises(ValueError, match=r"optimizer.pt is truncated or corrupt \([\d.]+ (bytes|KB|MB); \[Errno 22\]"):
        ckpt.load_checkpoint(path.parent)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_refused_pickle_gets_no_advice_to_load_it_unsafely(two_checkpoints):
    path = ckpt.checkpoint_path(two_checkpoints, 2)
    torch.save({"state": {}, "param_groups": [], "x": Evil()}, path / "optimizer.pt")
    with pytest.raises(ValueError) as error:
        ckpt.load_checkpoint(path)
    message = str(error.value)
    assert "optimizer.pt holds a pickle with objects other than tensors and numbers (it refers to posix.system)" in message
    assert "weights_only" not in message and "False" not in message and not Path("pwned").exists()


def test_a_malicious_bin_model_is_a_clear_error(setup, tmp_path):
    from preftune.model.loading import load_model

    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(setup["model"] / "config.json", folder)
    state = weights(setup["model"])
    torch.save({**state, "evil": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin holds a pickle .* refuses to load") as error:
        load_model(str(folder))
    assert "weights_only" not in str(error.value)
    torch.save(state, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin is truncated or corrupt"):
        load_model(str(folder))


def test_a_second_ctrl_c_prints_no_traceback(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(StopOnSignal, "REPEAT_WINDOW_S", 0.0)
    on_policy_call(monkeypatch, send(signal.SIGINT), {1, 2})
    assert main(argv(setup, tmp_path / "run", grad_accum=2)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.startswith("preftune")] == [
        "preftune: aborted (Ctrl-C); steps since the last checkpoint were not saved"]


def test_a_signal_during_the_last_step_exits_non_zero_with_a_checkpoint(setup, tmp_path, monkeypatch):
    on_policy_call(monkeypatch, send(signal.SIGTERM), {2})
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(setup, out))
    assert (stopped.value.code, stopped.value.step) == (143, 2)
    assert stopped.value.checkpoint == ckpt.checkpoint_path(out, 2) and not (out / "model.safetensors").exists()
    train(config(setup, out, resume_from="latest"))  # nothing left to train: writes the final model
    assert (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# 9. progress off a terminal
# ------------------------------------------------------------------------------------------------

def test_progress_off_a_terminal_is_a_plain_line_now_and_then(setup, tmp_path, capsys):
    train(config(setup, tmp_path / "run", progress=True, max_steps=40, logging_steps=2))
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "dpo:" in line]
    assert len(lines) == 20, lines  # every 2nd step (a twentieth of 40), no carriage-return updates
    assert all(line.startswith("dpo: step ") and "\r" not in line for line in lines), lines
    assert lines[-1].startswith("dpo: step 40/40 (100%), loss ") and "s/step, ETA 0s" in lines[-1]
    assert lines[0].startswith("dpo: step 2/40 (5%), loss ")
