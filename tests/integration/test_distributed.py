"""Several processes give the same model as one: 2 gloo CPU processes with batch B each
train the same steps as 1 process with batch 2B (losses and final weights within 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preftune.data.order import balanced_split


def test_balanced_split_keeps_counts_equal_and_tokens_close():
    """8 examples of lengths 1..8 over 2 ranks: 4 each, token sums 18 and 18 (snake order)."""
    lengths = {i: i + 1 for i in range(8)}
    parts = balanced_split(list(range(8)), lambda i: lengths[i], world=2)
    assert [len(p) for p in parts] == [4, 4]
    assert sorted(parts[0] + parts[1]) == list(range(8))
    assert [sum(lengths[i] for i in p) for p in parts] == [18, 18]
    # 5 examples over 2 ranks: 3 and 2, none dropped or repeated; 1 example over 2 ranks: 1 and 0
    parts = balanced_split([10, 11, 12, 13, 14], lambda i: 1, world=2)
    assert sorted(len(p) for p in parts) == [2, 3] and sorted(parts[0] + parts[1]) == [10, 11, 12, 13, 14]
    assert sorted(len(p) for p in balanced_split([7], lambda i: 1, world=2)) == [0, 1]


def run_train(args: list[str], processes: int, cwd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "preftune", "train", *args, "--num-processes", str(processes)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


@pytest.mark.slow
@pytest.mark.parametrize("loss, extra", [("dpo", []), ("dpo", ["--precompute-ref"]), ("kto", [])],
                         ids=["dpo", "dpo-precompute", "kto"])
def test_two_processes_equal_one(tiny_model_dir, rule_data, tmp_path, loss, extra):
    """lr 1e-3: Adam divides by sqrt(v), so a weight whose gradient is ~0 moves by about lr
    whatever the sign of its float noise; at 3e-3 one lm_head entry of 24,576 differed by 1.3e-5."""
    common = ["--model", str(tiny_model_dir), "--data", str(rule_data["train"]), "--loss", loss,
              "--max-steps", "4", "--logging-steps", "1", "--max-length", "64", "--max-prompt-length", "32",
              "--learning-rate", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--seed", "0",
              "--no-progress", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train([*common, "--batch-size", "8", "--output-dir", str(one)], 1, tmp_path)
    run_train([*common, "--batch-size", "4", "--output-dir", str(two)], 2, tmp_path)
    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    # the trained weights moved: the comparison is not between two untouched copies
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.allclose(a[n], base[n]) for n in a)


@pytest.mark.slow
def test_uneven_tail_runs_every_collective_and_still_matches(tiny_model_dir, rule_data, tmp_path):
    """9 examples, global batch 8: the last step holds 1 example, so one rank gets none and runs a
    zero-weight stand-in batch (no hang); 9 held-out examples leave one rank without an eval batch.
    Losses, eval metrics and weights still equal the one-process run."""
    common = ["--model", str(tiny_model_dir), "--data", str(rule_data["train"]), "--eval-data",
              str(rule_data["eval"]), "--max-examples", "9", "--epochs", "1", "--logging-steps", "1",
              "--max-length", "64", "--max-prompt-length", "32", "--learning-rate", "1e-3", "--warmup-ratio", "0",
              "--lr-scheduler", "constant", "--seed", "0", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train([*common, "--batch-size", "8", "--output-dir", str(one)], 1, tmp_path)
    run_train([*common, "--batch-size", "4", "--output-dir", str(two)], 2, tmp_path)
    rows_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [0, 1, 2, 2]
    for a, b in zip(rows_one, rows_two):
        for key in a:
            if key.startswith(("eval/", "loss", "rewards/")):
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_fsdp2_full_shard_matches_unsharded(tmp_path, case):
    """accelerate's FSDP needs a GPU, so this drives torch's FSDP2 (``fully_shard``, what
    accelerate calls) over 2 gloo processes: the transformer auto-wrap policy finds the decoder
    layers through the LogProbModel wrapper, and the chunked-head log-probs and their DPO gradients
    (DTensor shards gathered) equal the unsharded model's within 1e-5. ``lora``: LoRA policy with
    the adapters-off reference computed first, through the wrapped module (its forward is what
    gathers the shards)."""
    here = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(here, "fsdp_worker.py"), str(tmp_path / "result"), case]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # gloo can abort a rank while its threads are torn down (seen once in ~10 runs on a loaded 2-core
        # machine, not reproduced alone or under a CPU hog): run the same workers once more, fresh files
        for stale in tmp_path.glob("result-*.json"):
            stale.unlink()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert result["wrapped"] == 2  # the tiny Llama's 2 decoder layers, each its own FSDP unit
        assert result["sharded_params"]
        assert result["logps_diff"] < 1e-5
        assert result["grad_rel_diff"] < 1e-5


@pytest.mark.slow
def test_sampling_on_two_processes_equals_one(tmp_path):
    """2 gloo processes each sample half of 14 samples (7 prompts x 2) and gather: both hold the 14
    completions one process draws (each sample's draws come from its own seeded generator)."""
    from integration.sampler_worker import completions

    here = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(here, "sampler_worker.py"), str(tmp_path / "result")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    alone, alone_logps = completions()
    assert len(alone) == 14 and len({tuple(c) for c in alone}) > 1
    for rank in range(2):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert result["world"] == 2 and result["completions"] == alone
        assert result["logps"] == pytest.approx(alone_logps, abs=1e-4)  # each sample's log-prob, gathered in order
        assert result["decoded"] == 7  # its own half, not all 14
