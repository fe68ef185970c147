"""Callbacks a caller of :func:`preftune.training.loop.train` may pass to watch a run without patching it.

Benchmarks use them to time steps and record what each batch holds. A hook runs on every rank, in the
loop's own process, and must not change what it is given: the run's numbers stay those of a run without
hooks.

    from preftune.training.hooks import TrainHooks
    from preftune.training.loop import train

    seconds = []
    train(cfg, hooks=TrainHooks(on_step=lambda stats: seconds.append(stats.seconds)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class StepStats:
    """One optimizer step as this rank saw it, handed to :attr:`TrainHooks.on_step` after the step.

    ``started`` / ``started_cpu``: ``time.perf_counter()`` and ``time.process_time()`` as the step
    began (before its first collate); ``seconds`` / ``cpu_seconds``: wall and process CPU time of
    the step (micro-batches, backward, clipping, the optimizer and scheduler step; logging,
    evaluation and checkpoints after it not included). ``pairs`` / ``tokens``: examples and
    their unique tokens in the step's global batches (every rank's). ``losses``: this rank's
    micro-batch losses. ``skipped``: the numerical guard skipped the update.
    ``gpu_peak_memory_gib``: this process's high-water mark so far (None off GPU).
    """

    step: int
    started: float
    started_cpu: float
    seconds: float
    cpu_seconds: float
    pairs: int
    tokens: int
    losses: list[float]
    grad_norm: float
    skipped: bool
    gpu_peak_memory_gib: float | None


@dataclass
class TrainHooks:
    """Optional callbacks of the training loop.

    ``on_batch(examples, batch)``: each training micro-batch, once collated (a
    :class:`preftune.data.batch.Batch` on the training device), before its forward; ``examples``
    the list of examples it holds. Zero-weight stand-in batches (a rank with no examples left in
    a global batch) are included. Held-out evaluation and reference precompute batches are not.
    ``on_step(stats)``: after each optimizer step, with its :class:`StepStats`.
    """

    on_batch: Callable[[list, object], None] | None = None
    on_step: Callable[[StepStats], None] | None = None
