"""Falling chosen likelihood, caught: DPO-type losses can widen the margin while the chosen responses' own
log-probs fall (the rejected ones falling faster; TRL #800, OpenRLHF #1054, LLaMA-Factory #7643). The run
still "learns" by its accuracy, but the model writes its preferred answers less likely than before.

:func:`chosen_drift` is the pure test on a metric history; :class:`ChosenDriftWatch` feeds it the logged
rows (held-out ``eval/logps/chosen`` and ``eval/rewards/margins`` where the run evaluates, else the running
``logps/chosen_vs_ref``, the chosen log-prob minus the reference's on each batch, and ``rewards/margins`` of the
training rows; a run without a reference is watched on its held-out rows only) and logs one warning, with the numbers and
the remedies (``--sft-weight``, ``--loss dpop``), the first time it fires.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger("preftune")

THRESHOLD = 5.0  # nats: a fall of the mean chosen log-prob (summed over a response) worth a warning
# held-out: the same examples at every evaluation, so their mean chosen log-prob is comparable over time; running:
# each row is another batch, so the chosen log-prob is read against the reference on the batch's own rows (a
# batch of longer responses has a lower summed log-prob without anything having moved)
SOURCES = (("held-out", "eval/logps/chosen", "eval/rewards/margins"),
           ("running", "logps/chosen_vs_ref", "rewards/margins"))


@dataclass(frozen=True)
class Drift:
    """The chosen log-prob fell from ``chosen_before`` to ``chosen_now`` while the margin rose from
    ``margin_before`` to ``margin_now`` (``source``: held-out or running), by step ``step``."""

    source: str
    step: float | None
    chosen_before: float
    chosen_now: float
    margin_before: float
    margin_now: float

    def message(self) -> str:
        at = f" by step {self.step:g}" if self.step is not None else ""
        what = "chosen log-prob" if self.source == "held-out" else "chosen log-prob (vs the reference)"
        return (f"the {self.source} {what} fell from {self.chosen_before:.2f} to {self.chosen_now:.2f} "
                f"({self.chosen_now - self.chosen_before:+.2f} nats){at} while the reward margin grew from "
                f"{self.margin_before:.3f} to {self.margin_now:.3f}: the preferred responses are becoming less "
                f"likely, the rejected ones faster. Remedies: --sft-weight 1.0 (an NLL term on the chosen "
                f"response, RPO) or --loss dpop (DPO-Positive: a penalty whenever the chosen log-prob falls "
                f"below the reference's)")


def chosen_drift(chosen: Sequence[float], margins: Sequence[float], threshold: float = THRESHOLD) -> bool:
    """True when the last chosen log-prob is more than ``threshold`` nats below the first while the last
    margin is above the first. ``chosen`` and ``margins``: one value per logged row, oldest first, of
    one length; NaN values are left out (a batch without a side)."""
    if len(chosen) != len(margins):
        raise ValueError(f"chosen ({len(chosen)} values) and margins ({len(margins)}) must be of one length")
    points = [(c, m) for c, m in zip(chosen, margins) if not (math.isnan(c) or math.isnan(m))]
    if len(points) < 2:
        return False
    (chosen_first, margin_first), (chosen_last, margin_last) = points[0], points[-1]
    return chosen_first - chosen_last > threshold and margin_last > margin_first


@dataclass
class ChosenDriftWatch:
    """Reads each logged row (:meth:`see`) and warns once when :func:`chosen_drift` fires on the held-out
    history (the running one while the run has logged fewer than two held-out rows). The history is this
    process's rows: a resumed run compares with its first row after the resume."""

    threshold: float = THRESHOLD
    warned: bool = False
    history: dict[str, list[tuple[float | None, float, float]]] = field(default_factory=dict)

    def see(self, row: dict) -> Drift | None:
        """Add ``row``'s chosen log-prob and margin to their history; the :class:`Drift` it warned about
        (once per run), else None."""
        for source, chosen_key, margin_key in SOURCES:
            chosen, margin = row.get(chosen_key), row.get(margin_key)
            if _number(chosen) and _number(margin):
                self.history.setdefault(source, []).append((row.get("step"), float(chosen), float(margin)))
        if self.warned:
            return None
        source = "held-out" if len(self.history.get("held-out", ())) >= 2 else "running"
        points = self.history.get(source, [])
        if not chosen_drift([c for _, c, _ in points], [m for _, _, m in points], self.threshold):
            return None
        self.warned = True
        first, last = points[0], points[-1]
        drift = Drift(source, last[0], first[1], last[1], first[2], last[2])
        log.warning(drift.message())
        return drift


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
