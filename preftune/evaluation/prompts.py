"""Prompts read from a file: a ``.txt`` of one prompt a line, or any data file ``preftune train`` reads."""

from __future__ import annotations

import os
from pathlib import Path

from preftune.data.errors import DataError
from preftune.data.formats import is_group_row, is_pair_row, to_example
from preftune.data.readers import read_rows
from preftune.data.records import Location
from preftune.evaluation.judges.base import Prompt


def read_prompts(source: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Prompts from a file, in order, at most ``limit``.

    * ``.txt``: one prompt per line (blank lines skipped; a prompt can't contain a newline:
      use JSONL for multi-line prompts);
    * anything ``preftune train`` reads (JSONL, JSON, Parquet, ...): the ``prompt`` field of
      each record (a string or a list of chat messages); records without one give the prompt
      of their pair (explicit or implicit, as in training), of their response group (UltraFeedback's
      ``instruction``) or of their SFT ``messages``.
    """
    source = os.fspath(source)
    prompts: list[Prompt] = []
    if source.lower().endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise DataError(Location(source), "no such file")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        return prompts[:limit] if limit is not None else prompts
    for location, row in read_rows(source):
        if limit is not None and len(prompts) >= limit:
            break
        prompt = row.get("prompt")
        if isinstance(prompt, (str, list)) and prompt:
            prompts.append(prompt)
        elif is_pair_row(row):
            prompts.append(to_example(row, location, "pair").prompt)
        elif is_group_row(row):  # e.g. UltraFeedback's raw rows: the prompt is their 'instruction'
            prompts.append(to_example(row, location, "group").prompt)
        elif row.get("messages") is not None:
            prompts.append(to_example(row, location, "sft").prompt)
        else:
            raise DataError(location, "no prompt: a record needs a 'prompt' field, a chosen/rejected pair, "
                                      "a response group or 'messages'")
    if not prompts:
        raise DataError(Location(source), "no prompts")
    return prompts
