"""The one error type for bad input data: where it is and what is wrong, on one line."""

from __future__ import annotations

from preftune.data.records import Location


class DataError(ValueError):
    """A bad record or unreadable data source.

    ``str(err)`` reads ``pairs.jsonl:17: field 'chosen' is missing`` — the location
    first, then the message, so the line alone tells the user what to fix.
    """

    def __init__(self, location: Location | None, message: str):
        self.location = location
        self.message = message
        super().__init__(f"{location}: {message}" if location is not None else message)

    def __reduce__(self):  # keep pickling (e.g. across worker processes) working
        return (type(self), (self.location, self.message))


MAX_BAD_RECORD_SAMPLES = 5  # bad records quoted in a report; the rest are only counted


def count_bad_record(summary, err: DataError) -> None:
    """Count ``err`` on ``summary`` (any object with ``bad_records`` and ``bad_record_samples``),
    quoting the first :data:`MAX_BAD_RECORD_SAMPLES`."""
    summary.bad_records += 1
    if len(summary.bad_record_samples) < MAX_BAD_RECORD_SAMPLES:
        summary.bad_record_samples.append(str(err))
