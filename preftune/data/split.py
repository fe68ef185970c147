"""Train / eval split grouped by prompt: no prompt lands on both sides.

``split(src, train_out, eval_out, eval_fraction=0.1, seed=0)`` groups the records by their prompt
(:func:`prompt_key`: the prompt normalised by :func:`normalize_text`, so prompts that differ only in
case, punctuation or spacing are one group), shuffles the groups with ``random.Random(seed)`` and
moves whole groups to the eval side until it holds ``eval_size`` records (or ``eval_fraction`` of
them) or the next group would overshoot. The same file and seed always give the same split, and
the order of the records in the file does not matter. Records are written unchanged, in file
order; bad records (that ``preftune train`` would refuse) are skipped and counted.
"""

from __future__ import annotations

import os
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

from preftune.data.convert import atomic_outputs, check_output_path, detect_kind, write_rows_to
from preftune.data.errors import DataError, count_bad_record
from preftune.data.formats import to_example
from preftune.data.messages import messages_text
from preftune.data.readers import read_rows

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed (Unicode category P*), whitespace runs collapsed to one space,
    ends stripped: ``"  Hello,   World! "`` -> ``"hello world"``."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _SPACES.sub(" ", text).strip()


def prompt_key(prompt: str | list) -> str:
    """The key prompts are grouped and compared by (split, duplicate and leak checks)."""
    return normalize_text(messages_text(prompt))  # roles count when comparing


@dataclass
class SplitResult:
    """What :func:`split` did: ``rows_read == train_rows + eval_rows + bad_records``."""

    source: str
    seed: int
    rows_read: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    train_prompts: int = 0  # distinct prompt groups on each side (never shared)
    eval_prompts: int = 0
    bad_records: int = 0
    bad_record_samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (f"{self.rows_read} rows -> train {self.train_rows} ({self.train_prompts} prompts), "
                f"eval {self.eval_rows} ({self.eval_prompts} prompts), no prompt on both sides; "
                f"{self.bad_records} bad records skipped (seed {self.seed})")
        if self.bad_record_samples:
            line += f"; first bad: {self.bad_record_samples[0]}"
        return line


def split(src: str | os.PathLike, train_out: str | os.PathLike, eval_out: str | os.PathLike,
          eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0) -> SplitResult:
    """Split ``src`` into ``train_out`` and ``eval_out`` grouped by prompt (see the module docstring).

    Give ``eval_fraction`` (default 0.1) or ``eval_size`` (records), not both. Raises ``ValueError``
    for bad sizes, outputs that name the input or each other, or data with fewer than two prompts, and
    one line naming the output that cannot be written (an unwritable folder, a full disk): then neither
    file is written (:func:`preftune.data.convert.atomic_outputs`).
    """
    if eval_fraction is not None and eval_size is not None:
        raise ValueError("give eval_fraction or eval_size, not both")
    if eval_size is None and eval_fraction is None:
        eval_fraction = 0.1
    if eval_fraction is not None and not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction!r}")
    if eval_size is not None and (isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 1):
        raise ValueError(f"eval_size must be a positive integer, got {eval_size!r}")
    check_output_path(train_out, src)
    check_output_path(eval_out, src, train_out)

    result = SplitResult(source=os.fspath(src), seed=seed)
    keys = _prompt_keys(src, result)  # one per readable record, None for a bad one
    sizes: dict[str, int] = {}
    for key in keys:
        if key is not None:
            sizes[key] = sizes.get(key, 0) + 1
    good = sum(sizes.values())
    if len(sizes) < 2:
        raise ValueError(f"{os.fspath(src)}: {good} good records with {len(sizes)} distinct prompts; "
                         "a split grouped by prompt needs at least two")
    target = eval_size if eval_size is not None else max(1, round(eval_fraction * good))
    if target >= good:
        raise ValueError(f"eval_size {target} leaves no training data ({good} good records)")
    eval_keys = choose_eval_groups(sizes, target, seed)

    with atomic_outputs(train_out, eval_out) as (train_tmp, eval_tmp):  # both files or neither
        result.train_rows = write_rows_to(train_tmp, train_out, _side(src, keys, eval_keys, want_eval=False))
        result.eval_rows = write_rows_to(eval_tmp, eval_out, _side(src, keys, eval_keys, want_eval=True))
    result.eval_prompts = len(eval_keys)
    result.train_prompts = len(sizes) - len(eval_keys)
    return result


def choose_eval_groups(sizes: dict[str, int], target: int, seed: int) -> set[str]:
    """Prompt groups for the eval side: shuffled (seeded, independent of file order), taken while
    they fit in ``target`` records; if none fits, the smallest one (never all of them)."""
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    chosen, total = set(), 0
    for key in order:
        if total + sizes[key] <= target:
            chosen.add(key)
            total += sizes[key]
            if total == target:
                break
    if not chosen:
        chosen.add(min(order, key=lambda k: sizes[k]))  # first smallest in shuffled order
    return chosen


def _prompt_keys(src, result: SplitResult) -> list[str | None]:
    def on_bad(err: DataError) -> None:
        count_bad_record(result, err)

    def on_unreadable(err: DataError) -> None:
        result.rows_read += 1
        on_bad(err)

    keys = []
    for location, row in read_rows(src, on_bad_record=on_unreadable):
        result.rows_read += 1
        try:
            keys.append(prompt_key(to_example(row, location, detect_kind(row)).prompt))
        except DataError as err:
            on_bad(err)
            keys.append(None)
    return keys


def _side(src, keys: list[str | None], eval_keys: set[str], want_eval: bool) -> Iterator[dict]:
    """The raw records of one side, in file order (a second read of ``src``; bad ones skipped)."""
    rows = read_rows(src, on_bad_record=lambda err: None)
    for key, (_, row) in zip(keys, rows, strict=True):
        if key is not None and (key in eval_keys) == want_eval:
            yield row
