"""One call from a data source to tokenized examples, with a report of what happened on the way.

``load_dataset(source, tokenizer, kind)`` = ``read_rows`` -> ``to_example`` -> ``tokenize_examples``,
counting every record that was bad, truncated or dropped (:class:`preftune.data.report.DataReport`).
"""

from __future__ import annotations

import logging
import os
import warnings

from preftune.data.errors import DataError, count_bad_record
from preftune.data.formats import KINDS, chosen_as_sft, is_pair_row, pairs_to_unpaired, to_example
from preftune.data.order import attach_kl_partners
from preftune.data.readers import read_rows
from preftune.data.records import Example, Location, TokenizedExample
from preftune.data.report import DataReport
from preftune.data.tokenize import tokenize_examples

log = logging.getLogger("preftune")

PROGRESS_BAR_MIN_EXAMPLES = 2000  # show a tokenization progress bar above this many examples


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
    report.groups_kept = sum(1 for example in tokenized if example.scores is not None)
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


def read_examples(tokenizer, source: str, main: bool, *, kind: str, max_length: int | None = None,
                  max_prompt_length: int | None = None, skip_bad_records: bool = False, limit: int | None = None,
                  kl_partners: bool = False, seed: int = 0) -> tuple[list[TokenizedExample], DataReport]:
    """Tokenized examples of ``source`` for a method reading ``kind``, with the report logged when
    ``main`` (rank 0). ``kl_partners`` (KTO's KL reference point): each example also gets another
    example's completion (:func:`~preftune.data.order.attach_kl_partners`, seeded by ``seed``).
    Raises ValueError when no example is usable."""
    examples, report = load_dataset(source, tokenizer, kind=kind, max_length=max_length,
                                    max_prompt_length=max_prompt_length,
                                    skip_bad_records=skip_bad_records, limit=limit)
    if main:
        log.info("%s: %s", source, report.summary())
        if report.bad_records:
            log.warning("%s: skipped %d bad record(s) (--skip-bad-records); first: %s", source, report.bad_records,
                        "; ".join(report.bad_record_samples))
    if not examples:
        raise ValueError(f"{source}: no usable examples ({report.summary()})")
    if kl_partners:
        attach_kl_partners(examples, seed)
    return examples, report
