"""A candidates file -> labelling tasks.

A *candidates file* holds one prompt and its responses per record (JSONL, ``.jsonl.gz``, JSON,
Parquet: anything :func:`preftune.data.readers.read_rows` reads):

==============  ===================================================================================
candidates      ``{"prompt", "responses": [r1, r2, ...], "meta": {...}}`` — what ``preftune generate
                --keep-all`` writes; ``meta`` is optional and copied to the exported rows
pair            any pair ``preftune train`` reads (``prompt`` / ``chosen`` / ``rejected``, chat
                messages, implicit prompt): responses ``[chosen, rejected]``, for auditing labels
single          ``{"prompt", "completion"}`` (KTO or SFT rows) or ``{"messages": [...]}``: one
                response, labelled thumbs up / down
==============  ===================================================================================

A prompt is text or a list of chat messages ``{"role", "content"}``; a response is text or a list
of (assistant) messages. Every bad record is a :class:`~preftune.data.errors.DataError` naming its
``file:line``, raised before the app starts.

Modes (``mode``): ``pair`` shows two responses side by side; ``rank`` orders 2 to
:data:`MAX_RANKED` responses; ``thumbs`` shows one response at a time (each response of a record
becomes its own task); ``auto`` picks thumbs / pair / rank by the number of responses (1 / 2 / 3+).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from preftune.data.errors import DataError
from preftune.data.formats import is_pair_row, to_example
from preftune.data.readers import read_rows
from preftune.data.records import Location

MODES = ("auto", "pair", "rank", "thumbs")
MAX_RANKED = 9  # rank mode is driven with the digit keys 1-9
MAX_TEXT_CHARS = 200_000  # one prompt or response; longer texts are almost surely a wrong field


@dataclass(frozen=True)
class Task:
    """One thing to label: a prompt and the responses shown with it.

    ``responses`` are in the file's order (the *canonical* order; the page shows them in a
    random order per annotator, recorded with each label). ``response_index`` is, for a thumbs
    task made from a record with several responses, which one it shows.
    """

    line: int  # 1-based record number in the candidates file
    mode: str  # "pair" | "rank" | "thumbs"
    prompt: str | list
    responses: list
    meta: dict = field(default_factory=dict)
    response_index: int | None = None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (the store remembers which candidates file it was made from).
    Raises :class:`DataError` naming ``path`` when it is missing, a folder or unreadable."""
    source = os.fspath(path)
    check_candidates_path(source)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise DataError(Location(source), f"cannot read file: {err.strerror or err}") from None
    return digest.hexdigest()


def check_candidates_path(source: str) -> None:
    """:class:`DataError` unless ``source`` names an existing file (a folder is refused by name)."""
    if os.path.isdir(source):
        raise DataError(Location(source), "is a folder, not a candidates file (give a .jsonl, .jsonl.gz, .json "
                                          "or .parquet file)")
    if not os.path.isfile(source):
        raise DataError(Location(source), "no such file")


def read_tasks(path: str | os.PathLike, mode: str = "auto") -> list[Task]:
    """Every task of the candidates file ``path``, in file order. Raises :class:`DataError`
    (``file:line: ...``) at the first bad record or for a missing, folder or unreadable path,
    ``ValueError`` for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    source = os.fspath(path)
    check_candidates_path(source)
    tasks: list[Task] = []
    for location, row in read_rows(source):
        prompt, responses, meta = parse_candidate(row, location)
        tasks.extend(_tasks_of(prompt, responses, meta, location, mode))
    if not tasks:
        raise DataError(Location(source), "no records: a candidates file needs a prompt and responses per line")
    return tasks


def parse_candidate(row: dict, location: Location) -> tuple[str | list, list, dict]:
    """One record -> ``(prompt, responses, meta)`` (see the module docstring for the shapes)."""
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(location, f"field 'meta' must be an object, got {type(meta).__name__}")
    if "responses" in row:
        if "prompt" not in row:
            raise DataError(location, "field 'prompt' is missing (a candidates record is "
                                      "{\"prompt\", \"responses\": [...]})")
        prompt = _text(row["prompt"], "prompt", location)
        responses = row["responses"]
        if not isinstance(responses, list) or not responses:
            raise DataError(location, "field 'responses' must be a non-empty list of texts or message lists")
        return prompt, [_text(r, f"responses[{i}]", location, allow_empty=True)
                        for i, r in enumerate(responses)], meta
    if is_pair_row(row):
        example = to_example(row, location, "pair")
        return example.prompt, [example.chosen, example.rejected], {**meta, "chosen_index": 0}
    if "completion" in row or row.get("messages") is not None:
        example = to_example(row, location, "sft")
        return example.prompt, [example.completion], meta
    raise DataError(location, "not a candidates record: expected {\"prompt\", \"responses\": [...]}, a "
                              "chosen/rejected pair, or {\"prompt\", \"completion\"}")


def _tasks_of(prompt, responses: list, meta: dict, location: Location, mode: str) -> list[Task]:
    line = location.line if location.line is not None else (location.row or 0) + 1
    n = len(responses)
    if mode == "auto":
        mode = "thumbs" if n == 1 else "pair" if n == 2 else "rank"
    if mode == "thumbs":
        return [Task(line, "thumbs", prompt, [r], meta, response_index=i if n > 1 else None)
                for i, r in enumerate(responses)]
    if mode == "pair" and n != 2:
        raise DataError(location, f"pair mode shows two responses, this record has {n}; use --mode rank "
                                  "(or thumbs)")
    if mode == "rank" and not 2 <= n <= MAX_RANKED:
        raise DataError(location, f"rank mode orders 2 to {MAX_RANKED} responses, this record has {n}")
    return [Task(line, mode, prompt, list(responses), meta)]


def _text(value, name: str, location: Location, allow_empty: bool = False) -> str | list:
    """Text, or a list of ``{"role": str, "content": str}`` messages."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(location, f"field {name!r} is empty")
        _check_size(value, name, location)
        return value
    if isinstance(value, list) and value:
        for i, message in enumerate(value, 1):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(location, f"field {name!r} message {i}: expected "
                                          "{\"role\": str, \"content\": str}")
            _check_size(message["content"], name, location)
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(location, f"field {name!r} must be text or a non-empty list of messages, got {kind}")


def _check_size(text: str, name: str, location: Location) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(location, f"field {name!r} has {len(text):,} characters (at most {MAX_TEXT_CHARS:,})")
