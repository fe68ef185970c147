"""What a run writes and reads back: training-state checkpoints and resuming from them, the final
model, ``metrics.jsonl`` and the progress shown while it runs.

Every function taking ``accelerator`` is a collective where it says so (all ranks call it);
only the main process writes files. With FSDP, weights and AdamW moments are gathered into
one full copy on save and scattered back on resume, so a checkpoint does not depend on how
the model was sharded.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from preftune.common.files import (
    DiskFullError,
    disk_full_guard,
    free_bytes,
    json_safe,
    size_text,
    tensor_bytes,
    write_atomic,
)
from preftune.common.text import duration
from preftune.training import checkpoint as ckpt
from preftune.training.run_folder import save_model_folder

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


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the rows of steps after ``step`` (redone by a resumed run), so each step is logged once,
    and a torn last line (a crash mid-write), so the next row does not land on it."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    repaired = bool(lines) and not lines[-1].endswith("\n")
    if repaired:
        try:
            json.loads(lines[-1])
            lines[-1] += "\n"  # complete but for its newline
        except ValueError:
            log.warning("%s: dropped a torn last line (a crash mid-write): %.60s", path, lines.pop())

    def row_step(line: str) -> float:
        try:
            return float(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            return 0  # not ours to judge: keep it
    kept = [line for line in lines if row_step(line) <= step]
    if repaired or len(kept) < len(lines):
        write_atomic(path, "".join(kept))


def save_final(cfg, accelerator, model, tokenizer, run) -> None:
    """The final model + tokenizer in Hugging Face format (merged or adapter folder with LoRA), written
    atomically into ``run.out`` (:func:`preftune.training.run_folder.save_model_folder`).

    A full disk raises :class:`DiskFullError` saying where the trained weights are: a checkpoint of this
    step, or a copy written to the system's temp folder when that has room; nothing in ``run.out``
    is replaced then. A collective.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model).model  # the transformers (or peft) model
    if cfg.lora_r and cfg.merge_lora:
        unwrapped = unwrapped.merge_and_unload()
        state = unwrapped.state_dict()
    else:  # gathered across ranks (FSDP); keys of the LogProbModel wrapper start with "model."
        state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            unwrapped.save_pretrained(folder, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(folder)

        needed = tensor_bytes(state)
        try:
            save_model_folder(run.out, write, step=0, needed=needed)
        except DiskFullError as exc:
            raise DiskFullError(f"{exc}; nothing in {run.out} was replaced. {_keep_trained(run, write, needed)}") \
                from None
    accelerator.wait_for_everyone()


def _keep_trained(run, write, needed: int) -> str:
    """After a failed final save: where the trained weights are kept (a checkpoint of the last step,
    or a copy in the temp folder when it lies on another, roomier disk), as a sentence."""
    step = run.step
    latest = ckpt.list_checkpoints(run.out, run.run_id)
    if latest and ckpt.checkpoint_step(latest[-1]) == step:
        return (f"The trained weights are in checkpoint {latest[-1]}: free some space and run the same command "
                f"with --resume-from latest to write the final model")
    spare = Path(tempfile.gettempdir())
    free = free_bytes(spare)
    if free is not None and free > 2 * needed:
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"preftune-{run.run_id}-final-", dir=spare))
            write(folder)
            return f"The trained model was saved to {folder} instead: move it into place once there is space"
        except Exception as exc:  # the last resort failed as well: say so
            log.warning("could not keep the trained model in %s either: %s", spare, exc)
    kept = f" (the newest checkpoint is {latest[-1]}, step {ckpt.checkpoint_step(latest[-1])})" if latest else ""
    return f"The trained weights of step {step} could not be kept{kept}: free at least {size_text(needed)} and run again"


def summary_json(summary: dict) -> str:
    """summary.json's text: NaN and infinities become null (:func:`preftune.common.files.json_safe`)."""
    return json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False)


class MetricsLog:
    """``OUTPUT/metrics.jsonl``: one JSON object per row (trackers, ``--report-to``, wrap it:
    :func:`preftune.training.trackers.with_trackers`)."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with disk_full_guard(self.path, len(line.encode())), open(self.path, "a") as fh:
            fh.write(line)  # a torn line (a crash mid-write) is dropped by the resume: drop_metrics_after

    def close(self) -> None:
        pass  # each row is written and closed as it comes


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------

def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm on a terminal; off one (CI, ``nohup``, a notebook's log: stderr is not a TTY) a plain
    :class:`ProgressLines` line now and then instead of thousands of carriage-return updates."""
    from tqdm.auto import tqdm

    if enabled and not _isatty(sys.stderr):
        return ProgressLines(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """Progress as plain lines on stderr, ``dpo: step 40/200 (20%), loss 0.5123, acc 0.81, 0.42 s/step,
    ETA 1m07s``: one every ``every_steps`` steps (default a twentieth of the run) or ``EVERY_SECONDS``,
    whichever comes first, and one for the last step. The same calls as tqdm (update, set_postfix,
    close). A line falls due at ``update`` and is printed at the next call, so that the loss the loop
    sets just after a step's update is on that step's line."""

    EVERY_SECONDS = 30.0

    def __init__(self, total: int, initial: int, desc: str, every_steps: int | None = None):
        self.total, self.n, self.desc = total, initial, desc
        self.every_steps = every_steps or max(1, total // 20)
        self.start_n, self.start = initial, time.monotonic()
        self.printed_n, self.printed_at = initial, self.start
        self.postfix: dict = {}
        self.due: tuple[int, float] | None = None  # (step, time) of a line not printed yet

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        now = time.monotonic()
        if (self.n >= self.total or self.n - self.printed_n >= self.every_steps
                or now - self.printed_at >= self.EVERY_SECONDS):
            self.due = (self.n, now)

    def set_postfix(self, postfix: dict) -> None:
        self.postfix = dict(postfix)
        self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.due is None:
            return
        (step, now), self.due = self.due, None
        done, elapsed = step - self.start_n, now - self.start
        parts = [f"{self.desc}: step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if done > 0:
            per_step = elapsed / done
            parts += [f"{per_step:.2f} s/step", f"ETA {duration(per_step * max(0, self.total - step))}"]
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.printed_n, self.printed_at = step, now

