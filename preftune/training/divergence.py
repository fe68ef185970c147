"""The numerical guard: bad steps are skipped, and a collapsing run stops, pointing to a checkpoint that is good.

After each optimizer step's gradient the loop tells :meth:`StepGuard.after_step` whether the step was
skipped (a non-finite loss or gradient on any rank: weights and AdamW moments left unchanged), the
gradient norm and the trainable weights' norm (:func:`weights_norm`). The run stops
(:class:`TrainingDiverged`) when

* ``--max-bad-steps`` consecutive steps were skipped;
* ``--max-bad-steps`` consecutive steps had an all-zero gradient: a saturated, collapsed model (at
  ``--learning-rate 1e3`` a tiny Llama's first update sends its weights to ~1e3, its output to uniform
  and every later gradient to exactly 0);
* the weights' norm became non-finite or :data:`EXPLODED_WEIGHTS_RATIO` times the norm they started
  from: one update that large destroys a model (a fine-tune moves the norm by percents, not 100x).

The message names the newest checkpoint that is actually good: finite weights that had not exploded
(each checkpoint's ``state.json`` records ``weights_norm``) and written before the collapse began, not
just the latest; with none kept it says to start again with a lower learning rate. A run whose every
step was skipped fails too (:meth:`StepGuard.check_trained`): its weights are the starting ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.training import checkpoint as ckpt

EXPLODED_WEIGHTS_RATIO = 100.0


class TrainingDiverged(ValueError):
    """The run collapsed (non-finite steps, zero gradients or exploded weights); the message names a
    checkpoint that is good, or says that none is kept."""


@dataclass
class StepGuard:
    """The guard's counters; :meth:`state` goes into every checkpoint and :meth:`restore` reads it back."""

    max_bad_steps: int
    bad_streak: int = 0  # consecutive skipped (non-finite) steps
    zero_streak: int = 0  # consecutive steps with an all-zero gradient
    applied_steps: int = 0  # steps whose update was applied, resumed runs included
    initial_norm: float | None = None  # the trainable weights' norm at the start of the run
    weights_norm: float | None = None  # ... after the last applied step
    collapse_start: int | None = None  # the step whose weights were the first bad ones (None: unknown)

    def restore(self, saved: dict, step: int) -> None:
        """Counters of a checkpoint's ``state.json`` (written at ``step``)."""
        self.bad_streak = int(saved.get("bad_streak", 0))
        self.zero_streak = int(saved.get("zero_streak", 0))
        self.applied_steps = int(saved.get("applied_steps", step - self.bad_streak))
        if saved.get("initial_weights_norm") is not None:
            self.initial_norm = float(saved["initial_weights_norm"])
        if saved.get("weights_norm") is not None:
            self.weights_norm = float(saved["weights_norm"])

    def state(self) -> dict:
        return {"bad_streak": self.bad_streak, "zero_streak": self.zero_streak, "applied_steps": self.applied_steps,
                "initial_weights_norm": self.initial_norm,
                "weights_norm": self.weights_norm if self.weights_norm is not None else self.initial_norm}

    @property
    def in_streak(self) -> bool:
        """A collapse may be under way: checkpoints written now must not push the good ones out."""
        return self.bad_streak > 0 or self.zero_streak > 0

    def after_step(self, step: int, skipped: bool, grad_norm: float, norm: float | None) -> str | None:
        """Count optimizer step ``step`` (1-based); the reason to stop, or None to go on.

        ``norm``: the weights' norm after the update (None when ``skipped``).
        """
        if skipped:
            self.bad_streak += 1
            self.zero_streak = 0
            if self.bad_streak >= self.max_bad_steps:
                return (f"{self.bad_streak} consecutive steps with a non-finite loss or gradient (steps "
                        f"{step + 1 - self.bad_streak}-{step})")
            return None
        self.bad_streak = 0
        self.applied_steps += 1
        self.weights_norm = norm
        if norm is not None and (not math.isfinite(norm) or self._exploded(norm)):
            self.collapse_start = step
            size = "non-finite" if not math.isfinite(norm) else (
                f"{norm:.3g}, {norm / self.initial_norm:.3g} times the {self.initial_norm:.3g} they started from")
            return f"the trained weights exploded at step {step} (their norm is {size})"
        if grad_norm == 0.0:
            self.zero_streak += 1
            if self.zero_streak >= self.max_bad_steps:
                first = step + 1 - self.zero_streak
                self.collapse_start = first - 1  # the weights after step first-1 already gave a zero gradient
                return (f"{self.zero_streak} consecutive steps with an all-zero gradient (steps {first}-{step}): "
                        f"the model has collapsed (saturated outputs)")
        else:
            self.zero_streak = 0
        return None

    def _exploded(self, norm: float) -> bool:
        return bool(self.initial_norm) and norm > EXPLODED_WEIGHTS_RATIO * self.initial_norm

    def diverged(self, reason: str, output_dir, run_id: str | None, learning_rate: float) -> TrainingDiverged:
        """The exception to raise for ``reason``, naming the newest good checkpoint of run ``run_id``."""
        good = good_checkpoint(output_dir, run_id, before=self.collapse_start, initial_norm=self.initial_norm)
        if good is not None:
            advice = (f"The last good weights are in checkpoint {good} (step {ckpt.checkpoint_step(good)}, finite and "
                      f"from before the collapse): to go on from there with a lower learning rate, "
                      f"--resume-from {good} --learning-rate {learning_rate / 10:g}")
        else:
            kept = [p.name for p in ckpt.list_checkpoints(output_dir, run_id)]
            after = f" ({', '.join(kept)} {'was' if len(kept) == 1 else 'were'} written after it began)" if kept else ""
            advice = (f"No kept checkpoint predates the collapse{after}: start again with a lower --learning-rate "
                      f"(now {learning_rate:g})")
        rows = " Check the rows named above, or try --dtype float32." if "non-finite loss" in reason else ""
        return TrainingDiverged(f"{reason}; stopping. {advice}.{rows}")

    def check_trained(self, steps: int) -> None:
        """Refuse to call a run trained whose every step was skipped (its weights are the starting ones)."""
        if steps > 0 and self.applied_steps == 0:
            raise TrainingDiverged(f"every one of the {steps} steps was skipped (a non-finite loss or gradient, see "
                                   f"the warnings above): the weights are the starting ones, so no model was "
                                   f"saved. Check the rows named above, or try a lower --learning-rate or "
                                   f"--dtype float32")


def good_checkpoint(output_dir, run_id: str | None, before: int | None, initial_norm: float | None) -> Path | None:
    """The newest checkpoint of run ``run_id`` whose weights are finite and not exploded, written with no
    zero-gradient streak under way and at a step < ``before`` (when given)."""
    for path in reversed(ckpt.list_checkpoints(output_dir, run_id)):
        if before is not None and ckpt.checkpoint_step(path) >= before:
            continue
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        norm = state.get("weights_norm")
        start = state.get("initial_weights_norm") or initial_norm
        if norm is None or not math.isfinite(norm) or state.get("zero_streak", 0):
            continue
        if start and norm > EXPLODED_WEIGHTS_RATIO * start:
            continue
        return path
    return None


def weights_norm(params, sharded: bool = False, reduce=None) -> float:
    """The L2 norm of all ``params`` together (float32 per tensor: an overflow reads as non-finite).

    ``sharded`` (FSDP): each rank holds a shard, so the squares are summed across ranks with ``reduce``
    (``accelerator.reduce``); unsharded copies (DDP) are the same on every rank and are not reduced.
    """
    params = list(params)
    if not params:
        return 0.0
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    squares = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in local]).pow(2).sum()
    if sharded and reduce is not None:
        squares = reduce(squares, reduction="sum")
    return float(squares.sqrt())
