"""The one error type for bad input data: where it is and what is wrong, on one line."""

from __future__ import annotations

from preftune.data.records import Location


class DataError(ValueError):
    """A bad record or unreadable data source.

    ``str(err)`` reads ``pairs.jsonl:17: field 'chosen' is missing`` — the location
    first, then the message, so the line alone tells the user what to fix. ``reason`` is one
    of :attr:`REASONS`: malformed (wrong JSON, types, missing fields), identical (chosen ==
    rejected), empty (an empty response), prompt_split (no shared turn to take the prompt from).
    """

    #: What kind of problem (``reason``): the data doctor counts records by it.
    REASONS = ("malformed", "identical", "empty", "prompt_split")

    def __init__(self, location: Location | None, message: str, reason: str = "malformed"):
        if reason not in self.REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}")
        self.location = location
        self.message = message
        self.reason = reason
        super().__init__(f"{location}: {message}" if location is not None else message)

    def __reduce__(self):  # keep pickling (e.g. across worker processes) working
        return (type(self), (self.location, self.message, self.reason))


MAX_BAD_RECORD_SAMPLES = 5  # bad records quoted in a report; the rest are only counted


def count_bad_record(summary, err: DataError) -> None:
    """Count ``err`` on ``summary`` (any object with ``bad_records`` and ``bad_record_samples``),
    quoting the first :data:`MAX_BAD_RECORD_SAMPLES`."""
    summary.bad_records += 1
    if len(summary.bad_record_samples) < MAX_BAD_RECORD_SAMPLES:
        summary.bad_record_samples.append(str(err))
