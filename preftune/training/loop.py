"""The one training loop, on ``accelerate``: every method, one path.

Read top to bottom: :func:`train` claims the output folder, :func:`preftune.training.setup.build_run`
builds the run (precision, data, model, reference, packing, memory plan, optimizer, resume), then for
each optimizer step :func:`preftune.training.step.train_step` (micro-batches -> log-probs -> objective
-> backward -> clip -> step), the numerical guard, logging, evaluation and checkpoints; :func:`finish`
saves the final model, the summary and the model card. What the run writes and reads back is in
:mod:`preftune.training.resume` (checkpoints and resume), :mod:`preftune.training.final_model` and
:mod:`preftune.training.metrics_log`; the run folder's lock, identity and re-run rules in
:mod:`preftune.training.run_folder`; the numerical guard in :mod:`preftune.training.divergence`;
Ctrl-C / SIGTERM in :mod:`preftune.training.signals`; callbacks for benchmarks in
:mod:`preftune.training.hooks`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from preftune.common.files import write_atomic
from preftune.config.train_config import TrainConfig
from preftune.training import checkpoint as ckpt
from preftune.training.final_model import save_final
from preftune.training.hooks import TrainHooks
from preftune.training.metrics_log import summary_json
from preftune.training.model_card import write_model_card
from preftune.training.progress import progress_bar
from preftune.training.resume import save_training_state
from preftune.training.run_folder import RunFolder, claim_output_dir
from preftune.training.setup import Run, build_run
from preftune.training.signals import StopOnSignal, TrainingInterrupted
from preftune.training.step import (
    MetricsWindow,
    gpu_peak_memory,
    guard_after_step,
    log_row,
    step_stats,
    train_step,
)

log = logging.getLogger("preftune")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)


def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Train as ``cfg`` says. The output folder is claimed first (its lock held until the run ends
    however it ends; a folder holding another run refused): :func:`preftune.training.run_folder.claim_output_dir`.

    ``hooks``: optional callbacks (:class:`preftune.training.hooks.TrainHooks`: each training
    micro-batch, each optimizer step's timing and memory) for benchmarks and tools that watch a run;
    they do not change its numbers.
    """
    cfg.validate()
    handlers = StopOnSignal.handlers()
    with claim_output_dir(cfg) as folder:
        try:
            return _train(cfg, folder, hooks or TrainHooks())
        finally:  # however it ended (a full disk mid-loop too), Ctrl-C and SIGTERM work as before
            StopOnSignal.put_back(handlers)


def _train(cfg: TrainConfig, folder: RunFolder, hooks: TrainHooks) -> TrainResult:
    run = build_run(cfg, folder)
    eval_before = {}
    if run.eval_examples and run.start_step == 0:
        eval_before = run.evaluate(run.model, run.eval_examples)
        log_eval(run, 0, eval_before)
    step, last_metrics = run_loop(cfg, run, hooks)
    return finish(cfg, run, step, last_metrics, eval_before)


def run_loop(cfg: TrainConfig, run: Run, hooks: TrainHooks) -> tuple[int, dict]:
    """Optimizer steps from ``run.start_step`` to ``run.total_steps`` -> (steps done, the last logged row).

    Raises :class:`TrainingDiverged` (the guard saw a collapse) or :class:`TrainingInterrupted`
    (Ctrl-C / SIGTERM: a checkpoint of the last finished step was written).
    """
    step = run.start_step
    micro = step * cfg.grad_accum  # micro-batches consumed so far (global position in the data order)
    stop = StopOnSignal(first_step=step)  # Ctrl-C / SIGTERM: checkpoint after this step, then exit
    bar = progress_bar(run.total_steps, step, cfg.loss, enabled=run.main and cfg.progress)  # plain lines off a tty
    run.model.train()
    window = MetricsWindow()
    last_metrics: dict = {}
    while step < run.total_steps and not stop.requested(run.accelerator):
        started, started_cpu = time.perf_counter(), time.process_time()
        outcome = train_step(cfg, run, step, micro, window, hooks)
        micro = outcome.micro
        collapse = guard_after_step(run, step, outcome)
        if collapse:
            stop_diverged(cfg, run, step, outcome, stop, collapse)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if hooks.on_step is not None:
            hooks.on_step(step_stats(run, step, outcome, started, started_cpu))
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:  # TR-DPO: the reference follows the policy
            run.reference.sync(run.accelerator.unwrap_model(run.model).model, cfg.ref_model_mixup_alpha)
        if step % cfg.logging_steps == 0 or step == run.total_steps:
            last_metrics = log_row(cfg, run, step, micro, window, outcome)
            write_row(run, last_metrics, bar)
            window = MetricsWindow()
        if run.eval_examples and cfg.eval_steps and step % cfg.eval_steps == 0 and step != run.total_steps:
            log_eval(run, step, run.evaluate(run.model, run.eval_examples))
        if cfg.save_steps and step % cfg.save_steps == 0:
            save_checkpoint(cfg, run, step, micro)
    bar.close()
    stop.requested(run.accelerator)  # a signal during the last step: checkpoint and exit non-zero, like any other
    stop.restore()
    if stop.stopping:  # the same decision on every rank (see StopOnSignal.requested)
        stop_interrupted(cfg, run, step, micro, stop)
    return step, last_metrics


def save_checkpoint(cfg: TrainConfig, run: Run, step: int, micro: int) -> Path | None:
    """The training state after ``step`` steps (a collective; the folder on the main process)."""
    return save_training_state(cfg, run.accelerator, run.model, run.optimizer, run.scheduler, step, micro, run.folder,
                               run.guard, run.method_state)


def stop_diverged(cfg: TrainConfig, run: Run, step: int, outcome, stop: StopOnSignal, collapse: str) -> None:
    """Finish step ``step + 1`` as the loop would and raise the guard's :class:`TrainingDiverged`.

    After skipped steps the weights are the last good step's: checkpoint them (a state the run passed
    through); collapsed weights are not checkpointed.
    """
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if outcome.bad:
        save_checkpoint(cfg, run, step + 1, outcome.micro)
    stop.restore()
    raise run.guard.diverged(collapse, cfg.output_dir, run.folder.run_id, cfg.learning_rate)


def stop_interrupted(cfg: TrainConfig, run: Run, step: int, micro: int, stop: StopOnSignal) -> None:
    """Checkpoint step ``step`` (unless the loop just did) and raise :class:`TrainingInterrupted`."""
    just_saved = cfg.save_steps and step > stop.first_step and step % cfg.save_steps == 0
    path = ckpt.checkpoint_path(cfg.output_dir, step) if just_saved else save_checkpoint(cfg, run, step, micro)
    message = (f"interrupted at step {step} of {run.total_steps}; checkpoint saved to {path}. To continue, run the "
               f"same command with --resume-from latest")
    if run.main:
        log.warning(message)
    raise TrainingInterrupted(message, path if run.main else None, step, 128 + stop.signum)


def write_row(run: Run, row: dict, bar) -> None:
    """A training row to ``metrics.jsonl`` (and the trackers) and its loss / accuracy to the progress bar."""
    if not run.main:
        return
    run.metrics_log.write(row)
    postfix = {"loss": f"{row['loss']:.4f}"}
    if "rewards/accuracies" in row:
        postfix["acc"] = f"{row['rewards/accuracies']:.2f}"
    bar.set_postfix(postfix)


def log_eval(run: Run, step: int, result: dict) -> None:
    """A held-out evaluation's row, its metrics named ``eval/<name>`` (main process only)."""
    if run.main:
        run.metrics_log.write({"step": step, **{f"eval/{k}": v for k, v in result.items()}})


def finish(cfg: TrainConfig, run: Run, step: int, last_metrics: dict, eval_before: dict) -> TrainResult:
    """After the last step: the final model (first: an interrupted final eval loses nothing), the final
    held-out evaluation, ``summary.json`` and the model card (``OUTPUT/README.md``)."""
    run.guard.check_trained(step)  # every step skipped: fail, save nothing
    run.folder.step = step
    save_final(cfg, run.accelerator, run.model, run.tokenizer, run.folder)
    eval_after = run.evaluate(run.model, run.eval_examples) if run.eval_examples else {}
    if eval_after:
        log_eval(run, step, eval_after)
    out = Path(cfg.output_dir)
    if run.main:
        summary = {"steps": step, "train_data": run.train_report.summary(), "final": last_metrics,
                   "eval_before": eval_before, "eval_after": eval_after,
                   "reference": run.reference.description if run.reference is not None else "none",
                   "packing": run.packing, "processes": run.accelerator.num_processes,
                   "distributed": str(run.accelerator.distributed_type), "mixed_precision": run.precision,
                   "gradient_checkpointing": run.checkpointing, "run_id": run.folder.run_id,
                   "data_fingerprint": run.folder.data_fingerprint, **gpu_peak_memory(run.accelerator)}
        write_atomic(out / "summary.json", summary_json(summary))
        write_model_card(out, cfg, summary, num_examples=len(run.train_examples))  # OUTPUT/README.md
        run.metrics_log.close()
    return TrainResult(out, step, last_metrics, eval_before, eval_after)
