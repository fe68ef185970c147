"""One call from a data source to tokenized examples, with a report of what happened on the way.

``load_dataset(source, tokenizer, kind)`` = ``read_rows`` -> ``to_example`` -> ``tokenize_examples``,
counting every record that was bad, truncated or dropped (:class:`DataReport`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from preftune.data.errors import DataError, count_bad_record
from preftune.data.formats import KINDS, chosen_as_sft, is_pair_row, pairs_to_unpaired, to_example
from preftune.data.readers import read_rows
from preftune.data.records import Example, Location, TokenizedExample
from preftune.data.tokenize import tokenize_examples

PROGRESS_BAR_MIN_EXAMPLES = 2000  # show a tokenization progress bar above this many examples


@dataclass
class DataReport:
    """What :func:`load_dataset` did. For ``kind="pair"``:
    ``rows_read == examples_kept + bad_records + dropped``.
    """

    source: str
    kind: str
    rows_read: int = 0  # records met in the source, bad ones included (up to ``limit``)
    examples_kept: int = 0  # tokenized examples returned
    bad_records: int = 0  # skipped with skip_bad_records=True
    bad_record_samples: list[str] = field(default_factory=list)  # the first 5, "file:line: message"
    truncated: int = 0  # kept examples with some tokens cut
    dropped: int = 0  # examples whose completion truncation would have emptied
    prompt_sources: dict[str, int] = field(default_factory=dict)  # kept examples by Example.prompt_source
    template_mismatches: int = 0  # chat template rendered the prompt differently in the full conversation
    boundary_merges: int = 0  # a BPE token crossed the prompt/completion boundary (handled exactly)

    def summary(self) -> str:
        """One line for the log (the source is not repeated), e.g. ``2312 rows -> 2308 pair examples
        (implicit prompt 2308); 4 bad, 3 truncated, 0 dropped (...); first bad: hh.jsonl.gz:87: ...``.
        """
        sources = ", ".join(f"{name} prompt {count}" for name, count in sorted(self.prompt_sources.items()))
        line = (f"{self.rows_read} rows -> {self.examples_kept} {self.kind} examples"
                f"{f' ({sources})' if sources else ''}; {self.bad_records} bad, {self.truncated} truncated, "
                f"{self.dropped} dropped (no room for a completion under max_length)")
        if self.template_mismatches:
            line += f"; {self.template_mismatches} chat-template prompt mismatches (completions cut after the common prefix)"
        if self.bad_record_samples:
            line += f"; first bad: {self.bad_record_samples[0]}"
        return line


def load_dataset(source: str | os.PathLike, tokenizer, kind: str = "pair", max_length: int | None = None,
                 max_prompt_length: int | None = None, skip_bad_records: bool = False,
                 limit: int | None = None) -> tuple[list[TokenizedExample], DataReport]:
    """Read, convert and tokenize ``source``: ``(examples, report)``.

    ``kind`` is "pair", "unpaired" or "sft". A paired file read as "unpaired" becomes
    (chosen, True), (rejected, False) examples in alternation; read as "sft", its chosen
    side. ``examples[i].index == i``. ``limit`` stops after that many rows. Without
    ``skip_bad_records`` the first bad record raises :class:`DataError`; with it bad
    records are skipped and counted in the report (the caller decides how to warn).
    A chat-template prompt mismatch is warned about once, with its count.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    report = DataReport(source=os.fspath(source), kind=kind)

    def on_bad(err: DataError) -> None:
        if not skip_bad_records:
            raise err
        count_bad_record(report, err)

    def on_bad_row(err: DataError) -> None:  # a record the reader could not parse: still a row read
        if limit is None or report.rows_read < limit:
            report.rows_read += 1
            on_bad(err)

    examples: list[Example] = []
    for location, row in read_rows(source, on_bad_record=on_bad_row):
        if limit is not None and report.rows_read >= limit:
            break
        report.rows_read += 1
        try:
            examples.extend(_convert(row, location, kind))
        except DataError as err:
            on_bad(err)

    tokenized = tokenize_examples(tokenizer, examples, max_length, max_prompt_length, report=report, on_bad=on_bad,
                                  progress=len(examples) > PROGRESS_BAR_MIN_EXAMPLES)
    report.examples_kept = len(tokenized)
    if report.template_mismatches:
        warnings.warn(f"{report.source}: for {report.template_mismatches} examples the chat template renders "
                      "the prompt differently inside the full conversation; their completions were cut after "
                      "the longest common prefix of the two renderings; check the template", stacklevel=2)
    return tokenized, report


def _convert(row: dict, location: Location, kind: str) -> list[Example]:
    """One row -> its examples (two for a pair row read as unpaired)."""
    if kind == "unpaired" and is_pair_row(row):
        return pairs_to_unpaired([to_example(row, location, "pair")])
    if kind == "sft" and is_pair_row(row) and row.get("messages") is None:  # an explicit 'messages' wins
        return chosen_as_sft([to_example(row, location, "pair")])
    return [to_example(row, location, kind)]
