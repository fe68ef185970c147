"""One contender per fresh process: TRL's ``DPOTrainer`` or preftune's ``train``, timed per step.

Each ``run_*`` function is called inside its own subprocess (see ``dpo_throughput.py --worker``),
so the process's peak RSS (``preftune.common.process.peak_rss_mb``: Linux ``VmHWM``, which unlike
``ru_maxrss`` does not start from the parent's size at the fork) is that contender's alone. They return a plain dict:

* ``step_seconds``: wall time of every optimizer step, in order (step 1 is the warmup);
* ``batches``: per step, what the collator built: ``pairs``, ``sequence_tokens`` (prompt+chosen
  plus prompt+rejected), ``unique_tokens`` (prompt once), ``completion_tokens``, ``slots``
  (elements of ``input_ids``) and ``real_tokens`` (non-padding elements of ``input_ids``);
* ``losses``: the training loss per step (step 1 is ``log 2`` for both: policy == reference);
* ``cpu_window``: wall and process CPU seconds over the timed steps (for preftune steps 2 .. N-1,
  between collate calls), to tell how much of the machine the run really had.

Timing: TRL's step k is the time between consecutive ``on_step_end`` callbacks (data loading,
both forwards, backward, clipping, optimizer step and logging included). preftune's is its own
``metrics.jsonl`` window with ``logging_steps=1`` (``pairs / pairs_per_second``), which covers the
same work. Batches are matched to steps by collator call order (one micro-batch per step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preftune.common.allocator import settings_env

# Contender name -> what it runs. "trl-fast" is the quickest TRL 1.16 setting we found on a
# 2-core CPU that keeps a live reference model: TRL's default bf16 autocast (faster than fp32
# on CPUs with AVX512-BF16), no gradient checkpointing, length-grouped sampling (less padding).
# padding_free is unavailable in 1.16 (it falls back to padding), and precompute_ref_log_probs
# would drop the reference forward from the timed loop.
CONTENDERS = {
    "trl-default": dict(kind="trl", overrides={}),
    "trl-fast": dict(kind="trl", overrides=dict(gradient_checkpointing=False), group_by_length=True),
    "trl-fast-fp32": dict(kind="trl", overrides=dict(bf16=False, gradient_checkpointing=False),
                          group_by_length=True),
    "trl-fp32": dict(kind="trl", overrides=dict(bf16=False, gradient_checkpointing=False)),
    "trl-fp32-ckpt": dict(kind="trl", overrides=dict(bf16=False)),
    "trl-liger": dict(kind="trl", overrides=dict(use_liger_kernel=True)),
    "preftune": dict(kind="preftune", packing=True),
    "preftune-padded": dict(kind="preftune", packing=False),
    "preftune-ckpt": dict(kind="preftune", packing=True, gradient_checkpointing="on"),
    "preftune-no-ckpt": dict(kind="preftune", packing=True, gradient_checkpointing="off"),
    "preftune-bf16": dict(kind="preftune", packing=True, mixed_precision="bf16"),
    "preftune-fp32": dict(kind="preftune", packing=True, mixed_precision="no"),
    # glibc's mmap threshold fixed at 128 KiB: freed tensors go back to the OS instead of the heap
    "preftune-mmap": dict(kind="preftune", packing=True, env={"MALLOC_MMAP_THRESHOLD_": "131072"}),
    "preftune-bf16-ref": dict(kind="preftune", packing=True, mixed_precision="bf16", ref_dtype="bfloat16"),
    # the allocator settings the preftune command runs with (preftune.common.allocator), from the process's start
    "preftune-heap": dict(kind="preftune", packing=True, gradient_checkpointing="off", env=settings_env()),
}
DEFAULT_CONTENDERS = ["trl-default", "trl-fast", "preftune", "preftune-padded"]


RESULT_MARK = "@@BENCH-RESULT@@ "  # prefixes the one stdout line a worker process returns its result on
QUIET_ENV = dict(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                 TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")


def run_worker_process(script: str | Path, spec: dict, log_path: Path, env: dict) -> dict:
    """``python SCRIPT --worker SPEC`` in a fresh process (its own peak RSS) with ``env`` added to
    :data:`QUIET_ENV` and this environment; its stderr goes to ``log_path``; the dict it printed after
    :data:`RESULT_MARK` (:func:`print_result`). A failed worker raises with the log's last lines."""
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **QUIET_ENV, **env})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text().splitlines()[-25:]
        raise RuntimeError(f"{spec['name']} failed (exit {proc.returncode}); last lines of {log_path}:\n" +
                           "\n".join(tail))
    return json.loads(lines[-1][len(RESULT_MARK):])


def print_result(result: dict) -> None:
    """A worker's answer to :func:`run_worker_process`."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def describe(name: str) -> str:
    return {
        "trl-default": "TRL 1.16 DPOTrainer, DPOConfig defaults (bf16 autocast, gradient checkpointing)",
        "trl-fast": "TRL, bf16 autocast, no gradient checkpointing, train_sampling_strategy=group_by_length",
        "trl-fast-fp32": "TRL, fp32, no gradient checkpointing, train_sampling_strategy=group_by_length",
        "trl-fp32": "TRL, fp32, no gradient checkpointing, random sampling",
        "trl-fp32-ckpt": "TRL, fp32, gradient checkpointing (TRL's defaults less bf16 autocast)",
        "trl-liger": "TRL defaults + use_liger_kernel=True (liger-kernel's fused DPO loss and layers)",
        "preftune": "preftune train(), defaults (packed prefix-shared, --mixed-precision auto, "
                    "--gradient-checkpointing auto)",
        "preftune-padded": "preftune train(), packing=False (padded batches)",
        "preftune-ckpt": "preftune train(), --gradient-checkpointing on",
        "preftune-no-ckpt": "preftune train(), --gradient-checkpointing off",
        "preftune-bf16": "preftune train(), --mixed-precision bf16 (fp32 master weights)",
        "preftune-fp32": "preftune train(), --mixed-precision no (fp32 compute; checkpointing auto)",
        "preftune-mmap": "preftune train(), defaults, with MALLOC_MMAP_THRESHOLD_=131072 (glibc allocator)",
        "preftune-bf16-ref": "preftune train(), --mixed-precision bf16 --ref-dtype bfloat16",
        "preftune-heap": "preftune train(), --gradient-checkpointing off, with the preftune command's allocator "
                         "settings (every block from glibc's heap, no trimming)",
    }[name]


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ TRL

def run_trl(spec: dict) -> dict:
    """Train TRL's DPOTrainer for ``spec["steps"]`` optimizer steps; see the module docstring."""
    _set_threads(spec["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    contender = CONTENDERS[spec["name"]]
    batches: list[dict] = []

    class RecordingCollator(DataCollatorForPreference):
        """TRL's own collator, noting what each batch holds (token counts from the id lists)."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            prompt = sum(len(e["prompt_ids"]) for e in examples)
            completions = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
            batches.append({"pairs": len(examples), "sequence_tokens": 2 * prompt + completions,
                            "unique_tokens": prompt + completions, "completion_tokens": completions,
                            "slots": out["input_ids"].numel(), "real_tokens": int(out["attention_mask"].sum())})
            return out

    stamps: list[float] = []
    cpu_stamps: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in open(spec["pairs_file"])]
    if contender.get("group_by_length"):
        # LengthGroupedSampler reads a precomputed "length" column; keeping it needs
        # remove_unused_columns=False (TRL's collator ignores the extra columns).
        def text(row, side):  # chat rows: the rendered conversation (grouping needs relative lengths only)
            if isinstance(row["prompt"], list):
                return tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            return row["prompt"] + row[side]

        for row in rows:
            row["length"] = len(tokenizer(text(row, "chosen"))["input_ids"]) + \
                len(tokenizer(text(row, "rejected"))["input_ids"])
    dataset = Dataset.from_list(rows)

    output_dir = tempfile.mkdtemp(prefix="bench-trl-")
    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                  max_length=spec["max_length"], beta=0.1, learning_rate=1e-6, logging_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, seed=42, use_cpu=spec["device"] == "cpu",
                  model_init_kwargs={"dtype": "float32"})  # fp32 weights; spec dtype bfloat16 = TRL's bf16 autocast
    if contender.get("group_by_length"):
        kwargs.update(train_sampling_strategy="group_by_length", remove_unused_columns=False)
    kwargs.update(contender["overrides"])
    if spec["dtype"] == "bfloat16" and "bf16" not in contender["overrides"]:
        kwargs["bf16"] = True
    args = DPOConfig(**kwargs)
    collator = RecordingCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                 truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)
    trainer = DPOTrainer(model=str(spec["model_dir"]), args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=collator, callbacks=[StepTimer()])
    if torch.cuda.is_available() and spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    settings = {"bf16_autocast": bool(args.bf16), "gradient_checkpointing": bool(args.gradient_checkpointing),
                "sampling": args.train_sampling_strategy, "optim": str(args.optim),
                "padding_free": bool(args.padding_free), "reference": "separate frozen model"}
    return {"step_seconds": [b - a for a, b in zip(stamps, stamps[1:])], "batches": batches[:len(stamps) - 1],
            "cpu_window": _cpu_window(stamps[1:], cpu_stamps[1:]), "losses": losses, "settings": settings,
            "dataset_pairs": len(trainer.train_dataset)}


def _cpu_window(wall: list[float], cpu: list[float]) -> dict:
    """Wall and process CPU seconds between the first and last stamp (CPU time counts every thread)."""
    if len(wall) < 2:
        return {"wall_seconds": 0.0, "cpu_seconds": 0.0, "steps": 0}
    return {"wall_seconds": wall[-1] - wall[0], "cpu_seconds": cpu[-1] - cpu[0], "steps": len(wall) - 1}


# ------------------------------------------------------------------------------------- preftune

def run_preftune(spec: dict) -> dict:
    """Train with ``preftune.training.loop.train`` for ``spec["steps"]`` optimizer steps; see the module docstring."""
    _set_threads(spec["threads"])
    import torch

    from preftune.config.train_config import TrainConfig
    from preftune.training.hooks import TrainHooks
    from preftune.training.loop import train

    contender = CONTENDERS[spec["name"]]
    batches: list[dict] = []
    stamps: list[float] = []  # wall and CPU clock at the start of each step (before its collate call)
    cpu_stamps: list[float] = []
    truncated = {"examples": 0}

    def record_batch(examples, batch):
        """What each training batch preftune's own collate built holds (the loop's code is untouched)."""
        truncated["examples"] += sum(1 for e in examples if e.truncated)
        batches.append({"pairs": len(examples), "sequence_tokens": sum(e.padded_tokens for e in examples),
                        "unique_tokens": sum(e.num_tokens for e in examples),
                        "completion_tokens": sum(len(c) for e in examples for c in e.completions),
                        "slots": batch.input_ids.numel(), "real_tokens": int(batch.num_tokens),
                        "packed": bool(batch.packed)})

    def record_step(stats):
        stamps.append(stats.started)
        cpu_stamps.append(stats.started_cpu)

    output_dir = Path(tempfile.mkdtemp(prefix="bench-preftune-"))
    cfg = TrainConfig(model=str(spec["model_dir"]), data=str(spec["pairs_file"]), output_dir=str(output_dir),
                      loss="dpo", beta=0.1, batch_size=spec["batch_size"], max_length=spec["max_length"],
                      max_prompt_length=None, max_steps=spec["steps"], logging_steps=1, dtype="float32",
                      progress=False, learning_rate=1e-6, packing=contender["packing"],
                      mixed_precision=contender.get("mixed_precision",
                                                    "bf16" if spec["dtype"] == "bfloat16" else "auto"),
                      gradient_checkpointing=contender.get("gradient_checkpointing", "auto"),
                      ref_dtype=contender.get("ref_dtype"))
    if torch.cuda.is_available() and spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        train(cfg, hooks=TrainHooks(on_batch=record_batch, on_step=record_step))
        rows = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
        summary = json.loads((output_dir / "summary.json").read_text())
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    rows = [r for r in rows if "pairs_per_second" in r]
    step_seconds = [batch["pairs"] / row["pairs_per_second"] for batch, row in zip(batches, rows)]
    settings = {"packing": summary.get("packing"), "reference": summary.get("reference"),
                "mixed_precision": summary.get("mixed_precision"),
                "gradient_checkpointing": summary.get("gradient_checkpointing"),
                "length_grouped": cfg.length_grouped, "logit_chunk_size": cfg.logit_chunk_size,
                "truncated_examples": truncated["examples"]}
    return {"step_seconds": step_seconds, "batches": batches[:len(rows)],
            "cpu_window": _cpu_window(stamps[1:], cpu_stamps[1:]),  # steps 2 .. N-1
            "losses": [r.get("loss", math.nan) for r in rows], "settings": settings,
            "dataset_pairs": None}


# ------------------------------------------------------------------------------------ matmul peak

def run_matmul_peak(spec: dict) -> dict:
    """The best FLOP/s of a square ``torch.mm`` (2 n^3 FLOPs) over a few sizes, in ``spec["dtype"]``."""
    _set_threads(spec["threads"])
    import torch

    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    sizes = [1024, 2048, 3072] if device == "cpu" else [4096, 8192]
    best = {"flops_per_second": 0.0}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        reps = 3 if device == "cpu" else 20
        for _ in range(2):  # warm up (thread pool, allocator, cuBLAS heuristics)
            torch.mm(a, b)
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            _sync(device)
            rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
            if rate > best["flops_per_second"]:
                best = {"flops_per_second": rate, "n": n}
    best["tf32"] = bool(device == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run(spec: dict) -> dict:
    """Entry point in the worker process: run ``spec["name"]`` and add its peak memory."""
    from preftune.common.process import peak_rss_mb

    if spec["name"] == "matmul-peak":
        return run_matmul_peak(spec)
    kind = CONTENDERS[spec["name"]]["kind"]
    result = run_trl(spec) if kind == "trl" else run_preftune(spec)
    result["peak_rss_bytes"] = int(peak_rss_mb() * 2**20)
    import torch

    if spec["device"] == "cuda" and torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result
