"""What a run logs: ``OUTPUT/metrics.jsonl`` (one JSON row per logged step or evaluation, trimmed back
on resume) and the text of ``OUTPUT/summary.json``. Each row is also shown to the falling-chosen-likelihood
watch (:mod:`preftune.training.chosen_drift`), which warns once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from preftune.common.files import json_safe, write_atomic, write_guard
from preftune.training.chosen_drift import ChosenDriftWatch

log = logging.getLogger("preftune")


class MetricsLog:
    """``OUTPUT/metrics.jsonl``: one JSON object per row (trackers, ``--report-to``, wrap it:
    :func:`preftune.training.trackers.with_trackers`)."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"
        self.chosen_drift = ChosenDriftWatch()

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with write_guard(self.path, len(line.encode())), open(self.path, "a") as fh:
            fh.write(line)  # a torn line (a crash mid-write) is dropped by the resume: drop_metrics_after
        self.chosen_drift.see(row)  # a warning, once, when chosen log-probs fall while margins grow

    def close(self) -> None:
        pass  # each row is written and closed as it comes


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


def summary_json(summary: dict) -> str:
    """summary.json's text: NaN and infinities become null (:func:`preftune.common.files.json_safe`)."""
    return json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False)
