"""Crash safety: atomic checkpoints, exact resumption, Ctrl-C, config refusal and the numerical guard.

The runs use a tiny Llama with attention dropout 0.1 (so the RNG state matters), 52 pairs in
batches of 4 with grad_accum 2 (13 micro-batches per epoch: step 7 crosses the epoch boundary
between its two micro-batches), a cosine schedule with warmup and AdamW. Every "equal" below is
``torch.equal`` on every tensor of the final ``model.safetensors`` (CPU, fixed seed).
"""

from __future__ import annotations

import json
import math
import os
import random
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
from preftune.config.train_config import TrainConfig
from preftune.model import logprobs  # the policy's forward (LogProbModel) calls logprobs.batch_logps: tests wrap it
from preftune.model.logprobs import LogpOutput
from preftune.model.tiny import tiny_model
from preftune.training import checkpoint as ckpt
from preftune.training.divergence import TrainingDiverged
from preftune.training.loop import train
from preftune.training.signals import StopOnSignal, TrainingInterrupted

MAX_STEPS = 12
REPO = Path(__file__).resolve().parents[2]
THREADS = 1  # every run here, in-process and subprocess: one thread (OpenMP spin-waits on busy cores)


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A tiny Llama with attention dropout, 52 train pairs and 8 held-out pairs."""
    folder = tmp_path_factory.mktemp("crash")
    model_dir = folder / "model"
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0, hidden=32, heads=2, attention_dropout=0.1)
    model.save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "train": write_jsonl(folder / "train.jsonl", rule_pairs(52, seed=3)),
            "eval": write_jsonl(folder / "eval.jsonl", rule_pairs(8, seed=4)), "root": folder}


def options(setup, out, **overrides) -> dict:
    values = dict(model=str(setup["model"]), data=str(setup["train"]), eval_data=str(setup["eval"]),
                  output_dir=str(out), loss="dpo", beta=0.1, learning_rate=3e-3, batch_size=4, grad_accum=2,
                  max_steps=MAX_STEPS, max_length=48, max_prompt_length=24, lr_scheduler="cosine", warmup_steps=2,
                  logging_steps=1, save_steps=1, save_total_limit=2, seed=0, progress=False,
                  mixed_precision="no")  # fp32 in every process, also on a CPU with bf16 (auto would pick it)
    values.update(overrides)
    return values


def config(setup, out, **overrides) -> TrainConfig:
    return TrainConfig(**options(setup, out, **overrides))


def argv(setup, out, **overrides) -> list[str]:
    return train_argv(options(setup, out, **overrides))


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """The uninterrupted run, every checkpoint kept: final weights and the run folder."""
    import preftune.model.precision

    out = setup["root"] / "uninterrupted"
    previous = torch.get_num_threads()  # module scope: set up before the per-test thread fixtures
    torch.set_num_threads(THREADS)
    try:  # ... and before conftest's fp32 rule for --mixed-precision auto: apply it here too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(preftune.model.precision, "_host_has_fast_bf16", lambda: False)
            train(config(setup, out, save_total_limit=0))
    finally:
        torch.set_num_threads(previous)
    return {"weights": load_file(str(out / "model.safetensors")), "out": out}


def assert_same_weights(expected: dict, out: Path) -> None:
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"{len(different)}/{len(expected)} tensors differ, e.g. {different[0]}"


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_each_step_logged_once(out: Path) -> None:
    rows = metric_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, MAX_STEPS]  # before training, once; after


# The CLI's main() with every micro-batch 50 ms slower (the result is unchanged): a signal sent when
# the poller sees step k then lands well before the end of the run, even on busy cores.
SLOW_CLI = """import sys, time
import preftune.model.logprobs as logprobs
from preftune.cli.main import main
fast = logprobs.batch_logps
logprobs.batch_logps = lambda *args, **kwargs: (time.sleep(0.05), fast(*args, **kwargs))[1]
sys.exit(main(sys.argv[1:]))
"""


def start_cli(setup, out, extra_env=None, **overrides) -> subprocess.Popen:
    """``preftune train ...`` (see SLOW_CLI) in a subprocess, THREADS threads like the in-process runs."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv(setup, out, **overrides)], env=env,
                                stdout=stdout, stderr=stderr, cwd=out)


def stderr_tail(out: Path) -> str:
    return (out / "stderr.txt").read_text()[-3000:]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until the training row of ``step`` is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended (code {proc.returncode}) before step {step}: {stderr_tail(out)}")
        path = out / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "loss" in row and row["step"] >= step:
                return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout} s")


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------

def undo_patches(monkeypatch) -> None:
    """``monkeypatch.undo()`` without undoing conftest's fp32 rule for --mixed-precision auto (the same
    fixture holds it: undone, a CPU with AVX512-BF16 would run the rest of the test in bf16)."""
    import preftune.model.precision

    monkeypatch.undo()
    monkeypatch.setattr(preftune.model.precision, "_host_has_fast_bf16", lambda: False)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so no clean-up code runs."""


def tiny_state(value: float):
    """A module with tied weights (like tied embeddings), its optimizer and scheduler."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 3, bias=False)
    params = {"embed.weight": module.weight, "head.weight": module.weight, "extra": torch.full((2,), value)}
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return params, optimizer, scheduler


@pytest.mark.parametrize("stage", ckpt.CRASH_STAGES)
def test_a_write_killed_at_any_stage_is_never_resumed_from(tmp_path, monkeypatch, stage):
    """Killed mid-write of step 2: `latest` is step 1 (step 2 once renamed); the next save cleans up."""
    params, optimizer, scheduler = tiny_state(1.0)
    ckpt.save_checkpoint(tmp_path, 1, params, optimizer, scheduler, {"step": 1}, keep=5)

    def crash(name, step):
        if name == stage:
            raise Killed

    monkeypatch.setattr(ckpt, "_crash_point", crash)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(tmp_path, 2, tiny_state(2.0)[0], optimizer, scheduler, {"step": 2}, keep=5)
    leftovers = [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir() if ckpt.TMP_MARK in p.name]
    latest = ckpt.resolve_resume("latest", tmp_path)
    if stage == "after_rename":  # complete and in place: a good checkpoint
        assert latest.name == "step-000002" and not leftovers
    else:
        assert latest.name == "step-000001" and leftovers == [f"step-000002.tmp-{os.getpid()}"]
    assert ckpt.load_checkpoint(latest)["model"]["extra"].tolist() == [float(latest.name[-1])] * 2

    undo_patches(monkeypatch)
    ckpt.save_checkpoint(tmp_path, 3, params, optimizer, scheduler, {"step": 3}, keep=5)
    names = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert all(ckpt.TMP_MARK not in n for n in names), names  # the leftover is gone
    loaded = ckpt.load_checkpoint(ckpt.resolve_resume("latest", tmp_path))
    assert torch.equal(loaded["model"]["embed.weight"], loaded["model"]["head.weight"])  # tied: both kept


def test_keeps_the_last_k_and_never_a_later_one(tmp_path):
    params, optimizer, scheduler = tiny_state(0.0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, params, optimizer, scheduler, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    # A run resumed from an earlier step writes step 2 again: the just-written one stays, the later ones too.
    ckpt.save_checkpoint(tmp_path, 2, params, optimizer, scheduler, {"step": 2}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000003", "step-000004"]
    ckpt.save_checkpoint(tmp_path, 4, params, optimizer, scheduler, {"step": 4, "again": True}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert ckpt.load_checkpoint(ckpt.resolve_resume("latest", tmp_path))["state"]["again"] is True


def test_rng_state_round_trip():
    import numpy as np

    random.gauss(0, 1)  # leaves a cached second normal in Python's state
    state = ckpt.rng_state()

    def draw():
        return torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn()

    first = draw()
    ckpt.set_rng_state(state)
    assert draw() == first


def test_unreadable_checkpoint_is_one_clean_error(tmp_path):
    params, optimizer, scheduler = tiny_state(0.0)
    path = ckpt.save_checkpoint(tmp_path, 1, params, optimizer, scheduler, {"step": 1}, keep=2)
    (path / "optimizer.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"checkpoint {path} is unreadable"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="no checkpoint in"):
        ckpt.resolve_resume("latest", tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------------
# exact resumption
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [3, 6])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(setup, reference, tmp_path, step):
    """Step 3: mid-epoch; step 6: the next step's micro-batches straddle the epoch boundary."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(reference["out"] / "metrics.jsonl", out / "metrics.jsonl")  # as a killed run leaves it
    source = ckpt.checkpoint_path(reference["out"], step)
    train(config(setup, out, resume_from=str(source)))
    assert_same_weights(reference["weights"], out)
    assert_each_step_logged_once(out)  # the redone steps' rows were dropped; eval-before not rewritten


def test_without_the_rng_restore_dropout_differs(setup, reference, tmp_path, monkeypatch):
    """The control: skip restoring the RNG state and the resumed run no longer matches."""
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    out = tmp_path / "no-rng"
    train(config(setup, out, resume_from=str(ckpt.checkpoint_path(reference["out"], 6))))
    got = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(got[k], v) for k, v in reference["weights"].items())


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(setup, reference, tmp_path):
    kill_at = random.Random(7).randint(2, 8)
    out = tmp_path / "killed"
    proc = start_cli(setup, out)
    wait_for_step(proc, out, kill_at)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, stderr_tail(out)
    assert not (out / "model.safetensors").exists(), "the run ended before the kill"
    latest = ckpt.resolve_resume("latest", out)
    assert ckpt.checkpoint_step(latest) >= kill_at - 1
    print(f"killed after step {kill_at} was logged; resuming from {latest.name}")

    train(config(setup, out, resume_from="latest"))
    assert_same_weights(reference["weights"], out)
    assert_each_step_logged_once(out)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume_is_bit_identical(setup, reference, tmp_path):
    """SIGKILL (the test hook) after the weights of checkpoint 5 are written, before the rest."""
    out = tmp_path / "killed-in-write"
    proc = start_cli(setup, out, extra_env={ckpt.CRASH_HOOK_ENV: "after_model:5"})
    assert proc.wait(timeout=240) == -signal.SIGKILL, stderr_tail(out)
    root = ckpt.checkpoint_dir(out)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004", f"step-000005.tmp-{proc.pid}"]
    assert ckpt.resolve_resume("latest", out).name == "step-000004"

    train(config(setup, out, resume_from="latest"))
    assert_same_weights(reference["weights"], out)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000011", "step-000012"]
    assert not [p for p in root.iterdir() if ckpt.TMP_MARK in p.name]  # the torn write was cleaned up


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(setup, reference, tmp_path):
    out = tmp_path / "ctrl-c"
    proc = start_cli(setup, out, save_steps=5)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=240) == 130, stderr_tail(out)
    err = (out / "stderr.txt").read_text()
    assert "Traceback" not in err, err[-3000:]
    interrupted = [line for line in err.splitlines() if "interrupted at step" in line]
    assert len(interrupted) == 1 and "--resume-from latest" in interrupted[0], err[-2000:]
    step = int(interrupted[0].split("interrupted at step ")[1].split()[0])
    assert ckpt.resolve_resume("latest", out) == ckpt.checkpoint_path(out, step)
    assert not (out / "model.safetensors").exists()

    train(config(setup, out, resume_from="latest", save_steps=5))
    assert_same_weights(reference["weights"], out)
    assert_each_step_logged_once(out)


@pytest.mark.slow
def test_two_processes_resume_bit_identically(setup, tmp_path):
    """2 gloo processes (each its own dropout RNG stream): resuming at step 2 of 4 on 2 processes gives
    the uninterrupted 2-process weights."""
    two = dict(num_processes=2, batch_size=2, max_steps=4, save_steps=2, save_total_limit=0, eval_data=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)

    def run(out, **extra):
        done = subprocess.run([sys.executable, "-m", "preftune", *argv(setup, out, **two, **extra)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "whole")
    rng = torch.load(ckpt.checkpoint_path(tmp_path / "whole", 2) / "rng.pt", weights_only=True)["ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    parts = tmp_path / "parts"
    shutil.copytree(ckpt.checkpoint_path(tmp_path / "whole", 2), ckpt.checkpoint_path(parts, 2))
    run(parts, resume_from="latest")
    assert_same_weights(load_file(str(tmp_path / "whole" / "model.safetensors")), parts)


def test_lora_dropout_run_interrupted_in_process_resumes_exactly(setup, tmp_path, monkeypatch):
    """LoRA (dropout 0.1, adapters-only checkpoints): SIGINT during step 2 -> TrainingInterrupted
    (exit code 130) with a checkpoint at step 2; resuming gives the uninterrupted adapters."""
    lora = dict(lora_r=4, lora_dropout=0.1, max_steps=4, eval_data=None, save_steps=None, grad_accum=1)
    train(config(setup, tmp_path / "whole", **lora))
    signal_on_call(monkeypatch, {2: signal.SIGINT})
    out = tmp_path / "parts"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(setup, out, **lora))
    assert (stopped.value.code, stopped.value.step) == (130, 2)
    assert stopped.value.checkpoint == ckpt.checkpoint_path(out, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back
    undo_patches(monkeypatch)
    assert all("lora_" in k for k in load_file(str(stopped.value.checkpoint / "model.safetensors")))
    train(config(setup, out, resume_from="latest", **lora))
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    parts = load_file(str(out / "adapter_model.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_bco_resumes_with_its_running_reward_shift(setup, tmp_path, monkeypatch):
    """BCO's delta (the running mean of batch rewards) is part of the checkpoint: stopped after step 2
    and resumed, the run ends with the uninterrupted run's weights, bit for bit. Without it the
    resumed run would restart delta from its next batch and train on another loss."""
    rows = []
    for pair in rule_pairs(32, seed=5):
        prompt = pair["chosen"][:pair["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")]
        rows.append({"prompt": prompt, "completion": pair["chosen"][len(prompt):], "label": True})
        rows.append({"prompt": prompt, "completion": pair["rejected"][len(prompt):], "label": False})
    data = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    bco = dict(loss="bco", data=str(data), eval_data=None, max_steps=4, save_steps=None)
    train(config(setup, tmp_path / "whole", **bco))
    signal_on_call(monkeypatch, {3: signal.SIGTERM})  # policy forwards 3-4 are step 2 (grad_accum 2)
    out = tmp_path / "parts"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(setup, out, **bco))
    assert stopped.value.step == 2
    mean, count = json.loads((stopped.value.checkpoint / "state.json").read_text())["method_state"]["reward_shift"]
    assert count == 4 and math.isfinite(mean)  # one value per micro-batch: 2 steps x grad_accum 2
    undo_patches(monkeypatch)
    train(config(setup, out, resume_from="latest", **bco))
    assert_same_weights(load_file(str(tmp_path / "whole" / "model.safetensors")), out)


def test_an_ignored_sigint_stays_ignored(setup, tmp_path, monkeypatch):
    """Started with SIGINT ignored (nohup, a script's background job): a SIGINT during training
    neither stops it nor is re-enabled afterwards; SIGTERM still checkpoints and stops."""
    quick = dict(max_steps=3, eval_data=None, save_steps=None, grad_accum=1)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signal_on_call(monkeypatch, {1: signal.SIGINT})
        assert train(config(setup, tmp_path / "ignored", **quick)).steps == 3  # ran to the end
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal_on_call(monkeypatch, {2: signal.SIGTERM})
        with pytest.raises(TrainingInterrupted) as stopped:
            train(config(setup, tmp_path / "term", **quick))
        assert (stopped.value.code, stopped.value.step) == (143, 2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def signal_on_call(monkeypatch, calls: dict[int, int]) -> None:
    """Send ``calls[n]`` to this process when the policy's forward runs the n-th time (reference
    forwards, which run without grad, are not counted)."""
    original, count = logprobs.batch_logps, {"n": 0}

    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] in calls:
                signal.raise_signal(calls[count["n"]])
        return original(*args, **kwargs)

    monkeypatch.setattr(logprobs, "batch_logps", wrapper)


def test_sigterm_checkpoints_and_exits_143_and_a_second_signal_aborts(setup, tmp_path, monkeypatch):
    quick = dict(max_steps=3, eval_data=None, save_steps=None, grad_accum=1)
    signal_on_call(monkeypatch, {1: signal.SIGTERM})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(setup, tmp_path / "term", **quick))
    assert (stopped.value.code, stopped.value.step) == (143, 1)
    assert stopped.value.checkpoint == ckpt.resolve_resume("latest", tmp_path / "term")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # Twice within a second (a process group's Ctrl-C forwarded again by torchrun): one request.
    signal_on_call(monkeypatch, {1: signal.SIGINT, 2: signal.SIGINT})
    with pytest.raises(TrainingInterrupted):
        train(config(setup, tmp_path / "forwarded", **{**quick, "grad_accum": 2}))
    # Asked again later (here: no window): stop at once, without a checkpoint.
    monkeypatch.setattr(StopOnSignal, "REPEAT_WINDOW_S", 0.0)
    signal_on_call(monkeypatch, {1: signal.SIGINT, 2: signal.SIGINT})
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, tmp_path / "twice", **{**quick, "grad_accum": 2}))
    assert not ckpt.list_checkpoints(tmp_path / "twice")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_works_as_usual_after_training_failed(setup, tmp_path, monkeypatch):
    """train() left by an exception: the next Ctrl-C is a plain KeyboardInterrupt, not swallowed."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(logprobs, "batch_logps", broken)
    with pytest.raises(RuntimeError):
        train(config(setup, tmp_path / "broken", max_steps=2, eval_data=None, save_steps=None))
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_with_another_beta_is_refused_naming_it(setup, reference, tmp_path, capsys):
    code = main(argv(setup, tmp_path / "other", beta=0.2,
                     resume_from=str(ckpt.checkpoint_path(reference["out"], 2))))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune")]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("preftune: error: checkpoint ") and "--beta: checkpoint 0.1, now 0.2" in err[0] and "written with other options" in err[0]


# ------------------------------------------------------------------------------------------------
# numerical guard
# ------------------------------------------------------------------------------------------------

class NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward (a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, bad_calls: set[int], where: str = "loss") -> list:
    """Make the policy's forward give NaN log-probs (``where="loss"``) or NaN gradients (``"gradient"``)
    on the given (1-based) calls; records each batch."""
    original = logprobs.batch_logps
    batches = []

    def maybe_nan(model, batch, *args, **kwargs):
        batches.append(batch)
        out = original(model, batch, *args, **kwargs)
        if len(batches) in bad_calls:
            logps = out.logps * float("nan") if where == "loss" else NanGradient.apply(out.logps)
            return LogpOutput(logps, out.counts, out.token_logps)
        return out

    monkeypatch.setattr(logprobs, "batch_logps", maybe_nan)
    return batches


def guard_config(setup, out, **overrides) -> TrainConfig:
    return config(setup, out, eval_data=None, grad_accum=1, save_total_limit=0, lr_scheduler="constant",
                  warmup_steps=0, **overrides)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_step_is_skipped_and_its_rows_named(setup, tmp_path, monkeypatch, caplog, where):
    batches = poison(monkeypatch, {3}, where)
    out = tmp_path / "nan"
    with caplog.at_level("WARNING", logger="preftune"):
        train(guard_config(setup, out, max_steps=4))
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    what = "loss nan" if where == "loss" else "gradient norm nan"
    assert len(warnings) == 1 and warnings[0].startswith(f"step 3: non-finite {what}; update skipped"), warnings
    named = set(warnings[0].split("rows: ")[1].split(", "))
    assert named == {f"{setup['train']}:{i + 1}" for i in batches[2].example_index.tolist()}

    step2, step3, step4 = (ckpt.load_checkpoint(ckpt.checkpoint_path(out, s)) for s in (2, 3, 4))
    assert all(torch.equal(step2["model"][k], step3["model"][k]) for k in step2["model"])  # unchanged
    for a, b in zip(step2["optimizer"]["state"].values(), step3["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))  # moments too
    assert any(not torch.equal(step3["model"][k], step4["model"][k]) for k in step3["model"])  # step 4 trains
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != rows[2]["loss"]  # NaN: nothing kept
    assert all(r["loss"] == r["loss"] for r in rows[:2] + rows[3:])


def test_consecutive_bad_steps_stop_with_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(3, 100)))
    out = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged) as diverged:
        train(guard_config(setup, out, max_steps=8, max_bad_steps=3, save_steps=None))
    last = ckpt.checkpoint_path(out, 5)
    assert f"checkpoint {last}" in str(diverged.value) and "(steps 3-5)" in str(diverged.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Its weights are those after step 2: compare with a clean 2-step run.
    undo_patches(monkeypatch)
    train(guard_config(setup, tmp_path / "two", max_steps=2, save_steps=None))
    clean = load_file(str(tmp_path / "two" / "model.safetensors"))
    saved = ckpt.load_checkpoint(last)["model"]
    assert all(torch.equal(saved[k], clean[k]) for k in clean)


def test_the_bad_step_count_survives_a_resume(setup, tmp_path, monkeypatch, caplog):
    """Steps 3 and 4 bad, checkpoint at 4, resume: a bad step 5 is the third in a row, as it would
    have been without the stop (the count is in the checkpoint, not reset by resuming)."""
    poison(monkeypatch, {3, 4, 5})
    out = tmp_path / "run"
    train(guard_config(setup, out, max_steps=4, max_bad_steps=3, save_steps=4))
    assert json.loads((ckpt.checkpoint_path(out, 4) / "state.json").read_text())["bad_streak"] == 2
    with pytest.raises(TrainingDiverged, match=r"\(steps 3-5\)"):
        train(guard_config(setup, out, max_steps=8, max_bad_steps=3, save_steps=4, resume_from="latest"))


def test_resuming_with_another_max_steps_warns_about_the_schedule(setup, tmp_path, caplog):
    out = tmp_path / "run"
    train(config(setup, out, eval_data=None, max_steps=2, save_steps=2, lr_scheduler="cosine"))
    with caplog.at_level("WARNING", logger="preftune"):
        train(config(setup, out, eval_data=None, max_steps=4, save_steps=2, lr_scheduler="cosine",
                     resume_from="latest"))
    assert any("--max-steps was 2, now 4" in r.getMessage() for r in caplog.records)
