"""Small text helpers every layer shares: close matches for a misspelt name, durations, numbers."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


def suggest(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The names of ``known`` closest to ``name`` (best first, at most ``n``): the one "did you mean" of the
    package. ``cutoff`` is difflib's similarity ratio in [0, 1]; callers word the hint for their context."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=cutoff)


def duration(seconds: float) -> str:
    """``7`` -> ``"7s"``, ``95`` -> ``"1m35s"``, ``7260`` -> ``"2h01m"`` (rounded to the second)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def number(value, spec: str = ".4f", missing: str = "n/a") -> str:
    """``value`` formatted with ``spec``; ``missing`` for None; text and ints other than bool as they are
    when ``spec`` is for floats and ``value`` is not one."""
    if value is None:
        return missing
    if isinstance(value, float) or spec[-1:] not in "efg%":
        return format(value, spec)
    return str(value)


def is_finite_number(value) -> bool:
    """True for an int or float (not a bool) that is finite: what a report or a tracker may show as a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
