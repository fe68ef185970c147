"""Data sources -> raw rows: ``(Location, dict)`` pairs, one per record, in file order.

Sources, chosen by what ``source`` names:

* ``pairs.jsonl`` / ``pairs.jsonl.gz``  — JSON Lines, one object a line (blank lines skipped);
* ``pairs.json`` / ``pairs.json.gz``    — one JSON array of objects, or JSON Lines;
* ``pairs.parquet``                     — a Parquet file;
* ``folder`` / ``folder:split``         — a ``datasets`` ``save_to_disk`` folder (a
  ``DatasetDict`` defaults to split ``train``);
* ``owner/name`` / ``owner/name:split`` — a hub dataset, via ``datasets.load_dataset``
  (split defaults to ``train``), tried only when no local file or folder matches.

Every failure is a :class:`~preftune.data.errors.DataError` naming the place:
``pairs.jsonl:17: invalid JSON: Expecting ',' delimiter (column 12)``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from preftune.data.errors import DataError
from preftune.data.records import Location

Row = tuple[Location, dict]
OnBad = Callable[[DataError], None]

JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# Suffixes that mark a source as a (missing) local file rather than a hub name.
_FILE_LIKE = re.compile(r"\.(jsonl|json|ndjson|gz|parquet|csv|tsv|txt|arrow)$", re.IGNORECASE)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def read_rows(source: str | os.PathLike, on_bad_record: OnBad | None = None) -> Iterator[Row]:
    """Rows of ``source`` as ``(Location, dict)``, lazily, in order.

    The source is resolved now (a missing file raises here, not on first ``next``);
    records are read as they are iterated. Raises :class:`DataError` for a missing,
    unreadable or unsupported source. A bad record (a malformed JSON line, an array
    element that is not an object) raises too, unless ``on_bad_record`` is given: then
    it is called with the error and reading goes on with the next record.
    """
    on_bad = on_bad_record or _raise
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(JSON_LINES_SUFFIXES):
            return _read_json_lines(source, path, on_bad)
        if name.endswith(JSON_SUFFIXES):
            return _read_json(source, path, on_bad)
        if name.endswith(PARQUET_SUFFIXES):
            return _read_parquet(source, path)
        raise DataError(Location(source), "unsupported file type; use .jsonl, .jsonl.gz, .json, .parquet "
                                          "or a datasets save_to_disk folder")
    if path.is_dir():
        return _read_saved_dataset(source, None)
    folder, sep, split = source.rpartition(":")
    if sep and folder and split and Path(folder).expanduser().is_dir():
        return _read_saved_dataset(folder, split)
    if _FILE_LIKE.search(source) or source.startswith(("/", ".", "~")) or "\\" in source:
        raise DataError(Location(source), "no such file or folder")
    name, split = parse_hub_name(source)
    return _read_hub(name, split)


def parse_hub_name(source: str) -> tuple[str, str]:
    """``"owner/name:split"`` -> ``("owner/name", "split")``; the split defaults to ``"train"``.

    Raises :class:`DataError` when ``source`` is not a valid hub dataset name.
    """
    name, sep, split = source.partition(":")
    if sep and (not split or not re.fullmatch(r"[\w.\-\[\]%:+]+", split)):
        raise DataError(Location(source), f"bad split {split!r} in hub dataset name; write 'owner/name:split'")
    if not _HUB_NAME.match(name):
        raise DataError(Location(source), "not a local file or folder, nor a hub dataset name "
                                          "('owner/name' or 'owner/name:split')")
    return name, (split if sep else "train")


def _raise(err: DataError) -> None:
    raise err


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _parse_json(text: str, location: Location, hint: str = "") -> object:
    """``json.loads`` whose every failure is a DataError at ``location``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}" if location.line is None else f"column {err.colno}"
        raise DataError(location, f"invalid JSON: {err.msg} ({where}){hint}") from None
    except RecursionError:
        raise DataError(location, f"invalid JSON: nested too deeply{hint}") from None
    except ValueError as err:  # e.g. an integer literal too long to convert
        raise DataError(location, f"invalid JSON: {err}{hint}") from None


def _opener(path: Path) -> Callable:
    if path.name.lower().endswith(".gz"):
        return lambda: gzip.open(path, "rb")
    return lambda: open(path, "rb")


def _read_json_lines(source: str, path: Path, on_bad: OnBad, hint: str = "") -> Iterator[Row]:
    line_no = 0
    try:
        with _opener(path)() as f:
            for line_no, raw in enumerate(f, 1):
                location = Location(source, line=line_no)
                try:
                    value = _parse_line(raw, location, hint)
                except DataError as err:
                    on_bad(err)
                    continue
                if value is not None:
                    yield location, value
    except (OSError, EOFError, zlib.error) as err:  # unreadable or corrupt (gzip) file
        after = f" after line {line_no}" if line_no else ""
        raise DataError(Location(source), f"cannot read file{after}: {err}") from None


def _parse_line(raw: bytes, location: Location, hint: str) -> dict | None:
    """One JSON Lines line -> its object, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(location, f"not valid UTF-8 (byte {err.start + 1} of the line)") from None
    text = text.rstrip("\r\n")  # so a JSON error at the end of the line reports its column on it
    if location.line == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    value = _parse_json(text, location, hint)
    if not isinstance(value, dict):
        raise DataError(location, f"expected a JSON object, got {_json_type(value)}")
    return value


def _read_json(source: str, path: Path, on_bad: OnBad) -> Iterator[Row]:
    """A ``.json`` file: one array of objects (element ``i`` -> ``line=i+1``), else JSON Lines."""
    try:
        with _opener(path)() as f:
            head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(Location(source), f"cannot read file: {err}") from None
    if not head.startswith("["):
        yield from _read_json_lines(source, path, on_bad, hint="; a .json file must hold one array of objects "
                                                         "or one object per line")
        return
    try:
        with _opener(path)() as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(Location(source), f"not valid UTF-8 (byte {err.start + 1})") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(Location(source), f"cannot read file: {err}") from None
    array = _parse_json(text, Location(source))
    if not isinstance(array, list):  # "[" then not an array cannot parse; kept for clarity
        raise DataError(Location(source), f"expected a JSON array of objects, got {_json_type(array)}")
    for i, value in enumerate(array):
        location = Location(source, line=i + 1)
        if not isinstance(value, dict):
            on_bad(DataError(location, f"array element {i + 1}: expected a JSON object, got {_json_type(value)}"))
            continue
        yield location, value


def _read_parquet(source: str, path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(Location(source), f"not a readable Parquet file: {err}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield Location(source, row=row), record
            row += 1


def _read_saved_dataset(folder: str, split: str | None) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(Path(folder).expanduser()))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(Location(folder), f"not a datasets save_to_disk folder: {err}") from None
    label = folder
    if isinstance(dataset, datasets.DatasetDict):
        split = split or "train"
        if split not in dataset:
            raise DataError(Location(folder), f"no split {split!r}; available: {', '.join(sorted(dataset))} "
                                              f"(pick one as '{folder}:SPLIT')")
        dataset, label = dataset[split], f"{folder}:{split}"
    elif split is not None:
        raise DataError(Location(f"{folder}:{split}"), "this folder holds a single Dataset, not a DatasetDict; "
                                                       "drop the ':split'")
    return _iterate_dataset(label, dataset)


def _iterate_dataset(label: str, dataset) -> Iterator[Row]:
    for row, record in enumerate(dataset):
        yield Location(label, row=row), record


def _read_hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    label = f"{name}:{split}"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (offline, not found, bad split): report all cleanly
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(Location(label), f"no local file or folder of that name, and loading it as a hub "
                                         f"dataset failed: {type(err).__name__}: {message}") from None
    return _iterate_dataset(label, dataset)
