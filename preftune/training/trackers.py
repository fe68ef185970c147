"""``--report-to``: every metrics row also goes to TensorBoard, Weights & Biases, MLflow or Trackio.

Through accelerate's tracker classes (``accelerate.tracking``), each configured as its own library
is, by its environment variables: ``WANDB_MODE=offline`` / ``WANDB_DIR`` / ``WANDB_PROJECT``,
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_DIR`` / ``TRACKIO_PROJECT``.
TensorBoard writes to ``OUTPUT_DIR/tensorboard``. The project is ``preftune`` unless those
variables say otherwise; the run is named ``--run-name`` or the output folder's name.

``metrics.jsonl`` stays the record of the run: :func:`with_trackers` wraps the metrics log so that
each ``write(row)`` also sends the row's numbers to every tracker. Only the main process logs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from preftune.common.text import is_finite_number

log = logging.getLogger("preftune")

PROJECT = "preftune"


def with_trackers(metrics_log, cfg, out: Path):
    """``metrics_log`` itself when ``cfg`` reports to no tracker, else a :class:`TrackedLog` around it.

    Starts every tracker now (before the model loads: a tracker that can't start, e.g. wandb without
    a login, fails the run at once with one line) and stores the run's options in each."""
    names = cfg.trackers
    if not names:
        return metrics_log
    trackers = []
    try:
        for name in names:
            trackers.append(start_tracker(name, cfg, Path(out)))
    except BaseException:
        for tracker in trackers:
            tracker.finish()
        raise
    options = {k: ("none" if v is None else v) for k, v in cfg.to_dict().items()}
    for tracker in trackers:
        tracker.store_init_configuration(options)
    log.info("reporting to %s", ", ".join(_where(t, Path(out)) for t in trackers))
    return TrackedLog(metrics_log, trackers)


def start_tracker(name: str, cfg, out: Path):
    """accelerate's tracker for ``name``, started; ValueError with the tracker's own reason if it can't."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    run_name = cfg.run_name or Path(cfg.output_dir).name
    if name == "tensorboard":
        tracker = TensorBoardTracker("tensorboard", out)
    elif name == "wandb":
        tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name)
    elif name == "mlflow":  # MLFLOW_EXPERIMENT_NAME, if set, wins over the name given here
        tracker = MLflowTracker(PROJECT, run_name=run_name)
    elif name == "trackio":
        tracker = TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name)
    else:  # config validation refuses other names
        raise ValueError(f"--report-to: unknown tracker {name!r}")
    try:
        tracker.start()
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--report-to {name}: the tracker could not start: {reason[:400]}") from exc
    return tracker


class TrackedLog:
    """The metrics log plus trackers: ``write(row)`` appends the row to metrics.jsonl and logs its
    numbers (all but ``step``) to each tracker at that step; ``close()`` closes them all."""

    def __init__(self, metrics_log, trackers: list):
        self.metrics_log, self.trackers = metrics_log, trackers

    def write(self, row: dict) -> None:
        self.metrics_log.write(row)
        numbers = {k: v for k, v in row.items() if k != "step" and is_finite_number(v)}
        for tracker in self.trackers:
            tracker.log(numbers, step=int(row["step"]))

    def close(self) -> None:
        self.metrics_log.close()
        for tracker in self.trackers:
            tracker.finish()

    def __getattr__(self, name):  # anything else the metrics log offers
        return getattr(self.metrics_log, name)


def _where(tracker, out: Path) -> str:
    if tracker.name == "tensorboard":
        return f"tensorboard ({out / 'tensorboard'})"
    if tracker.name == "wandb":
        return f"wandb ({os.environ.get('WANDB_MODE', 'online')})"
    if tracker.name == "mlflow":
        return f"mlflow ({os.environ.get('MLFLOW_TRACKING_URI', 'its default store')})"
    return tracker.name
