"""What a run writes and reads back: training-state checkpoints and resuming from them, the final
model, and ``metrics.jsonl``.

Every function taking ``accelerator`` is a collective where it says so (all ranks call it);
only the main process writes files. With FSDP, weights and AdamW moments are gathered into
one full copy on save and scattered back on resume, so a checkpoint does not depend on how
the model was sharded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt

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
                        bad_streak: int = 0) -> Path | None:
    """Checkpoint all the rest of the run depends on: trainable weights, optimizer moments, scheduler
    position, every rank's RNG state, the data position (``micro`` micro-batches consumed) and the
    count of consecutive skipped (non-finite) steps.

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
        path = ckpt.save_checkpoint(cfg.output_dir, step, state, optimizer_state, scheduler,
                                    {"step": step, "micro": micro, "processes": accelerator.num_processes,
                                     "bad_streak": bad_streak, "config": cfg.to_dict()}, cfg.save_total_limit, rng=rng)
    accelerator.wait_for_everyone()
    return path


def resume(cfg, accelerator, model, optimizer, scheduler) -> tuple[int, int]:
    """Restore ``cfg.resume_from`` into the prepared model, optimizer and scheduler, and this rank's
    RNG state; return its step (the loop derives the data position: step x grad_accum micro-batches)
    and the count of consecutive skipped steps it had reached.

    Refuses a checkpoint written under other options (naming each, with both values) or by another
    number of processes. Drops the metrics rows of the steps after it, which the run will redo.
    """
    path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
    loaded = ckpt.load_checkpoint(path)
    saved = loaded["state"]
    diffs = ckpt.config_differences(saved.get("config") or {}, cfg.to_dict())
    if diffs:
        raise ValueError(f"checkpoint {path} was written with other options: {'; '.join(diffs)}. Resume with the "
                         f"checkpoint's options, or start a new run in another --output-dir")
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
    ckpt.set_rng_state(loaded["rng"]["ranks"][accelerator.process_index])
    step = int(saved["step"])
    if accelerator.is_main_process:
        drop_metrics_after(Path(cfg.output_dir) / "metrics.jsonl", step)
        log.info("resumed from %s at step %d", path, step)
        before = (saved.get("config") or {}).get("max_steps")
        if before != cfg.max_steps and cfg.lr_scheduler != "constant":
            log.warning("--max-steps was %s, now %s: the %s learning-rate schedule is laid over the new total, "
                        "so the rate at step %d changes (same --max-steps keeps the original schedule)",
                        before, cfg.max_steps, cfg.lr_scheduler, step + 1)
    return step, int(saved.get("bad_streak", 0))


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the rows of steps after ``step`` (redone by a resumed run), so each step is logged once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def row_step(line: str) -> float:
        try:
            return float(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            return 0  # not ours to judge: keep it
    kept = [line for line in lines if row_step(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def save_final(cfg, accelerator, model, tokenizer, out: Path) -> None:
    """The final model + tokenizer in Hugging Face format (merged or adapter folder with LoRA)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model).model  # the transformers (or peft) model
    if cfg.lora_r and cfg.merge_lora:
        unwrapped = unwrapped.merge_and_unload()
        state = unwrapped.state_dict()
    else:  # gathered across ranks (FSDP); keys of the LogProbModel wrapper start with "model."
        state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()


class MetricsLog:
    """``OUTPUT/metrics.jsonl`` (one JSON object per row) and, with ``--tensorboard``, the same
    scalars in ``OUTPUT/tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, out: Path, tensorboard: bool = False):
        self.path = out / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, global_step=row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
