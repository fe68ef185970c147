"""Training-state checkpoints of a running run and resuming from them.

:func:`save_training_state` gathers what the rest of the run depends on (trained weights, AdamW moments,
scheduler, every rank's RNG, the data position, the run's identity, the guard's counters, the method's
state) and hands it to :func:`preftune.training.checkpoint.save_checkpoint`; :func:`resume` puts a
checkpoint back into the prepared model, optimizer and scheduler.

Every function taking ``accelerator`` is a collective where it says so (all ranks call it); only the
main process writes files. With FSDP, weights and AdamW moments are gathered into one full copy on
save and scattered back on resume, so a checkpoint does not depend on how the model was sharded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from preftune.training import checkpoint as ckpt
from preftune.training.metrics_log import drop_metrics_after

log = logging.getLogger("preftune")


def trainable_state(accelerator, model) -> dict[str, torch.Tensor]:
    """Weights that training changes, named as in the transformers (or peft) model: adapters only
    with LoRA, else the full state dict. ``model`` is the prepared :class:`LogProbModel`."""
    inner = accelerator.unwrap_model(model).model
    state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if hasattr(inner, "peft_config"):
        names = {n for n, p in inner.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_training_state(cfg, accelerator, model, optimizer, scheduler, step: int, micro: int,
                        run=None, guard=None, method_state: dict | None = None) -> Path | None:
    """Checkpoint all the rest of the run depends on: trainable weights, optimizer moments, scheduler
    position, every rank's RNG state, the data position (``micro`` micro-batches consumed), the run
    that wrote it (``run``: its id and data fingerprint), the numerical guard's counters (``guard``)
    and what the method keeps across batches (``method_state``: BCO's running mean reward, the same
    on every rank).
    While a collapse may be under way (``guard.in_streak``) no older checkpoint is removed.

    A collective (every rank calls it); returns the folder on the main process, else ``None``.
    """
    from accelerate.utils import gather_object

    state = trainable_state(accelerator, model)
    optimizer_state = optimizer
    if _is_fsdp(accelerator):  # moments are sharded like the weights: gather them, keyed by parameter name
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = gather_object([ckpt.rng_state()])  # one per rank: ranks draw different dropout masks
    path = None
    if accelerator.is_main_process:
        record = {"step": step, "micro": micro, "processes": accelerator.num_processes, "config": cfg.to_dict(),
                  **(run.identity() if run is not None else {}), **(guard.state() if guard is not None else {})}
        if method_state:
            record["method_state"] = {key: list(value) for key, value in method_state.items()}
        keep = 0 if guard is not None and guard.in_streak else cfg.save_total_limit
        path = ckpt.save_checkpoint(cfg.output_dir, step, state, optimizer_state, scheduler, record, keep, rng=rng)
    accelerator.wait_for_everyone()
    return path


def resume(cfg, accelerator, model, optimizer, scheduler, run) -> dict:
    """Restore ``run.resume_path`` (resolved, and its options checked, by
    :func:`preftune.training.run_folder.claim_output_dir`) into the prepared model, optimizer and scheduler,
    and this rank's RNG state; return its ``state.json``, whose ``step`` the loop continues from (the
    data position is step x grad_accum micro-batches) and whose guard counters it restores.

    Refuses a checkpoint written by another number of processes. A changed ``--learning-rate`` is
    applied to the restored schedule and said in the log. Drops the metrics rows of the steps after
    it (which the run will redo) and a torn last row.
    """
    path = run.resume_path
    loaded = ckpt.load_checkpoint(path)
    saved = loaded["state"]
    processes = int(saved.get("processes", 1))
    if processes != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was written by {processes} processes, now {accelerator.num_processes}: "
                         f"the global batch and data order would change; resume with {processes} processes")
    expected = set(trainable_state(accelerator, model))
    inner = accelerator.unwrap_model(model).model
    unexpected = sorted(set(loaded["model"]) - set(inner.state_dict()))
    if unexpected:
        raise ValueError(f"checkpoint {path} has unexpected weights, e.g. {unexpected[0]}")
    missing = sorted(expected - set(loaded["model"]))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} trained weights, e.g. {missing[0]}")
    if _is_fsdp(accelerator):  # full tensors from the file, each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(inner, loaded["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer.optimizer, loaded["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        inner.load_state_dict(loaded["model"], strict=False)
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    before_lr = (saved.get("config") or {}).get("learning_rate")
    given = getattr(cfg, "given", None)  # None: built in Python without from_dict/CLI: every value counts as set
    if before_lr is not None and before_lr != cfg.learning_rate and given is not None \
            and "learning_rate" not in given:
        # not asked for: the run goes on at its own rate (the default must not replace it)
        if accelerator.is_main_process:
            log.info("learning rate %g from the checkpoint (give --learning-rate to change it on resume)", before_lr)
        cfg.learning_rate = before_lr
    elif before_lr is not None and before_lr != cfg.learning_rate:
        change_learning_rate(optimizer, scheduler, before_lr, cfg.learning_rate)
        if accelerator.is_main_process:
            log.warning("learning rate changed from %g to %g on resume: the schedule goes on from step %d with "
                        "the new peak rate (now %g)", before_lr, cfg.learning_rate, int(saved["step"]) + 1,
                        scheduler.get_last_lr()[0])
    ckpt.set_rng_state(loaded["rng"]["ranks"][accelerator.process_index])
    step = int(saved["step"])
    if accelerator.is_main_process:
        drop_metrics_after(Path(cfg.output_dir) / "metrics.jsonl", step)
        log.info("resumed run %s from %s at step %d", run.run_id, path, step)
        before = (saved.get("config") or {}).get("max_steps")
        if before != cfg.max_steps and cfg.lr_scheduler != "constant":
            log.warning("--max-steps was %s, now %s: the %s learning-rate schedule is laid over the new total, "
                        "so the rate at step %d changes (same --max-steps keeps the original schedule)",
                        before, cfg.max_steps, cfg.lr_scheduler, step + 1)
    return saved


def change_learning_rate(optimizer, scheduler, before: float, after: float) -> None:
    """Scale a restored schedule to another peak learning rate: the rate at every step is
    ``after / before`` times what it would have been (warmup and decay keep their shape)."""
    scale = after / before
    scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
