"""Rewrite a data file in another record format: ``convert(src, dst, to=...)``.

Targets (the input may be any format ``formats`` reads, its kind detected row by row):

==========  =====================================================================================
messages    conversational: ``prompt`` / ``chosen`` / ``rejected`` as lists of ``{"role", "content"}``
            messages. Dialogue text (Anthropic HH-RLHF) is split at ``"\\n\\nHuman:"`` /
            ``"\\n\\nAssistant:"`` into user / assistant turns; the prompt is the shared turns, each
            response one assistant message. KTO rows keep ``label``; SFT rows become ``messages``.
standard    plain strings ``prompt`` / ``chosen`` / ``rejected``; message lists are written as
            dialogue text (``"\\n\\nHuman: ...\\n\\nAssistant:"`` prompt, ``" reply"`` responses).
kto         unpaired ``prompt`` / ``completion`` / ``label``: each pair becomes (chosen, true) then
            (rejected, false), so labels alternate in file order.
sft         the chosen side: ``prompt`` / ``completion`` strings, or ``messages`` for conversations.
==========  =====================================================================================

Response groups (``{"prompt", "responses", "scores" | "ranks"}``, UltraFeedback's raw rows) stay groups
``{"prompt", "responses", "scores"}``: ``messages`` / ``standard`` convert the prompt and each response
(ranks are written as the scores they are read as, ``max(ranks) - rank``); ``sft`` keeps the best response;
``kto`` refuses them (counted as bad records).

UltraFeedback-style rows (``chosen`` / ``rejected`` conversations beside a ``prompt`` string, with
``score_chosen`` / ``score_rejected``) keep their scores; ``drop_equal_scores`` drops pairs whose
two scores are equal (no preference). Bad records are skipped and counted with their locations,
never fatal: the rest of the file is still converted. The output is ``.jsonl``, ``.jsonl.gz`` or
``.parquet`` by its name, written to a temporary file first and renamed, so a failed run never
leaves half a file behind; a run with no row to write writes nothing.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from preftune.common.files import atomic_path, write_guard
from preftune.data.errors import DataError, count_bad_record
from preftune.data.formats import chosen_as_sft, is_group_row, pairs_to_unpaired, to_example
from preftune.data.readers import read_rows
from preftune.data.records import Example

TARGETS = ("messages", "standard", "kto", "sft")
SCORE_KEYS = ("score_chosen", "score_rejected")
OUTPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")

_TURN = re.compile(r"\n\n(Human|Assistant|System):")
_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant", "System": "system"}
_SPEAKER_OF_ROLE = {role: speaker for speaker, role in _ROLE_OF_SPEAKER.items()}


@dataclass
class ConvertResult:
    """What :func:`convert` did: ``rows_read == converted + bad_records + sum(dropped.values())``."""

    source: str
    destination: str
    target: str
    rows_read: int = 0  # records met in the source, bad ones included
    converted: int = 0  # source records that were converted
    written: int = 0  # rows written (2 per pair for ``kto``)
    bad_records: int = 0  # records that could not be read or converted, skipped
    bad_record_samples: list[str] = field(default_factory=list)  # the first 5, "file:line: message"
    equal_scores: int = 0  # pairs with score_chosen == score_rejected (kept unless dropped)
    dropped: dict[str, int] = field(default_factory=dict)  # good records left out on purpose, by reason

    def summary(self) -> str:
        """One line, e.g. ``2312 rows -> 2308 pairs converted, 2308 rows written to hh.jsonl (messages); 4 bad``."""
        line = (f"{self.rows_read} rows -> {self.converted} converted, {self.written} rows written to "
                f"{self.destination} ({self.target}); {self.bad_records} bad records skipped")
        if self.equal_scores:
            line += f"; {self.equal_scores} pairs with equal scores"
        for reason, count in self.dropped.items():
            line += f"; {count} dropped ({reason})"
        if self.bad_record_samples:
            line += f"; first bad: {self.bad_record_samples[0]}"
        return line


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str,
            drop_equal_scores: bool = False) -> ConvertResult:
    """Convert every good record of ``src`` into format ``to`` and write them to ``dst``.

    Raises ``ValueError`` for an unknown target, an unsupported output name, or ``dst`` naming
    ``src``; :class:`DataError` when ``src`` cannot be opened; ``CannotWriteError`` / ``DiskFullError``
    (``ValueError``) naming ``dst`` when it cannot be written. Bad records are counted, not raised. No
    row to write: ``dst`` is not written (an existing file is left as it was).
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    check_output_path(dst, src)
    result = ConvertResult(source=os.fspath(src), destination=os.fspath(dst), target=to)

    def on_bad(err: DataError) -> None:
        count_bad_record(result, err)

    def on_unreadable(err: DataError) -> None:
        result.rows_read += 1
        on_bad(err)

    def rows_out():
        for location, row in read_rows(src, on_bad_record=on_unreadable):
            result.rows_read += 1
            try:
                example = to_example(row, location, detect_kind(row))
                if example.kind == "pair" and _equal_scores(row):
                    result.equal_scores += 1
                    if drop_equal_scores:
                        _count(result.dropped, "equal scores")
                        continue
                if example.kind == "unpaired" and to == "sft" and not example.label:
                    _count(result.dropped, "undesirable KTO examples have no SFT target")
                    continue
                converted = convert_example(example, to, row)
            except DataError as err:
                on_bad(err)
                continue
            result.converted += 1
            result.written += len(converted)
            yield from converted

    write_rows(dst, rows_out(), keep_empty=False)
    return result


def detect_kind(row: dict) -> str:
    """The kind a raw row holds: ``"pair"`` (chosen + rejected), ``"group"`` (``responses``, or
    UltraFeedback's raw ``completions``: :func:`~preftune.data.formats.is_group_row`), ``"unpaired"``
    (completion + label) or ``"sft"`` (anything else: prompt + completion, or messages)."""
    if "chosen" in row and "rejected" in row:
        return "pair"
    if is_group_row(row):
        return "group"
    if "completion" in row and "label" in row:
        return "unpaired"
    return "sft"


def convert_example(example: Example, to: str, row: dict | None = None) -> list[dict]:
    """One :class:`Example` -> its output rows in format ``to``. ``row`` (the raw record) supplies
    UltraFeedback scores to keep. Raises :class:`DataError` when the example has no such form."""
    if example.kind == "group":
        return [_group_row(example, to)]
    scores = {key: row[key] for key in SCORE_KEYS if row and row.get(key) is not None}
    if to == "kto":
        if example.kind == "sft":
            raise DataError(example.location, "an SFT record has no preference label; it cannot become a KTO example")
        unpaired = pairs_to_unpaired([example]) if example.kind == "pair" else [example]
        out = []
        for ex in unpaired:
            record = {"prompt": ex.prompt, "completion": ex.completion, "label": ex.label}
            score = scores.get("score_chosen" if ex.label else "score_rejected")
            out.append(record if score is None else {**record, "score": score})
        return out
    if to == "sft":
        ex = chosen_as_sft([example])[0] if example.kind == "pair" else example
        if isinstance(ex.prompt, list):
            return [{"messages": ex.prompt + ex.completion}]
        return [{"prompt": ex.prompt, "completion": ex.completion}]
    as_prompt, as_completion = ((prompt_messages, completion_messages) if to == "messages"
                                else (prompt_text, completion_text))
    if example.kind == "pair":
        return [{"prompt": as_prompt(example.prompt), "chosen": as_completion(example.chosen),
                 "rejected": as_completion(example.rejected), **scores}]
    if example.kind == "unpaired":
        return [{"prompt": as_prompt(example.prompt), "completion": as_completion(example.completion),
                 "label": example.label}]
    if to == "messages":
        return [{"messages": prompt_messages(example.prompt) + completion_messages(example.completion)}]
    return [{"prompt": prompt_text(example.prompt), "completion": completion_text(example.completion)}]


def _group_row(example: Example, to: str) -> dict:
    """A response group in format ``to``: ``{"prompt", "responses", "scores"}`` with the prompt and each
    response as messages or text (ranks were read as scores ``max(ranks) - rank``: same order, same
    ties); ``sft``: the best response (the first of equal scores). A group has no KTO label."""
    if to == "kto":
        raise DataError(example.location, "a response group has no desirable / undesirable label; it cannot "
                                          "become KTO examples (preftune data pairs ... --to kto --threshold T "
                                          "labels scored responses)")
    if to == "sft":
        best = max(range(len(example.scores)), key=example.scores.__getitem__)
        sft = Example(kind="sft", prompt=example.prompt, completion=example.responses[best], location=example.location)
        return convert_example(sft, "sft")[0]
    as_prompt, as_completion = ((prompt_messages, completion_messages) if to == "messages"
                                else (prompt_text, completion_text))
    return {"prompt": as_prompt(example.prompt), "responses": [as_completion(r) for r in example.responses],
            "scores": list(example.scores)}


# ---------------------------------------------------------------------------- text <-> messages


def dialogue_to_messages(text: str) -> list[dict]:
    """Dialogue text -> messages: ``"\\n\\nHuman: hi\\n\\nAssistant:"`` -> ``[{"role": "user", "content": "hi"}]``.

    Each ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` / ``"\\n\\nSystem:"`` opens a user / assistant /
    system turn (content stripped). A final empty assistant turn is the generation prompt and is
    dropped. Text with no turn marker is one user message; text before the first marker, when
    there is one, a system message.
    """
    parts = _TURN.split(text)
    lead, turns = parts[0], parts[1:]
    messages = []
    if lead.strip():
        messages.append({"role": "system" if turns else "user", "content": lead.strip()})
    for speaker, content in zip(turns[::2], turns[1::2]):
        messages.append({"role": _ROLE_OF_SPEAKER[speaker], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def messages_to_dialogue(messages: list[dict]) -> str:
    """Messages -> dialogue text, ``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` (no generation prompt)."""
    return "".join(f"\n\n{_speaker(m['role'])}: {m['content']}" for m in messages)


def prompt_messages(prompt: str | list) -> list[dict]:
    return dialogue_to_messages(prompt) if isinstance(prompt, str) else prompt


def completion_messages(completion: str | list) -> list[dict]:
    """A response as one assistant message. Dialogue markers inside it stay text: completions must be
    the assistant's alone, and HH has replies that run on into further turns."""
    return [{"role": "assistant", "content": completion.strip()}] if isinstance(completion, str) else completion


def prompt_text(prompt: str | list) -> str:
    return prompt if isinstance(prompt, str) else messages_to_dialogue(prompt) + "\n\nAssistant:"


def completion_text(completion: str | list) -> str:
    """A response as text after an ``"Assistant:"`` prompt: ``" reply"``; several assistant messages are
    joined as further assistant turns."""
    if isinstance(completion, str):
        return completion
    return messages_to_dialogue(completion).removeprefix("\n\nAssistant:")


def _speaker(role: str) -> str:
    return _SPEAKER_OF_ROLE.get(role, role.capitalize())


def _equal_scores(row: dict) -> bool:
    chosen, rejected = row.get("score_chosen"), row.get("score_rejected")
    return chosen is not None and rejected is not None and chosen == rejected


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


# ---------------------------------------------------------------------------- writing


def check_output_path(dst: str | os.PathLike, *sources: str | os.PathLike) -> None:
    """``ValueError`` unless ``dst`` ends in a supported suffix and is none of ``sources``."""
    name = os.fspath(dst).lower()
    if not name.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"{os.fspath(dst)}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
    target = Path(dst).expanduser().resolve()
    for source in sources:
        if Path(source).expanduser().resolve() == target:
            raise ValueError(f"{os.fspath(dst)}: output would overwrite the input; choose another name")


def write_rows(path: str | os.PathLike, rows: Iterable[dict], keep_empty: bool = True) -> int:
    """Write ``rows`` as JSON Lines (``.jsonl``, ``.jsonl.gz``) or Parquet (``.parquet``); the count.

    Written through :func:`atomic_outputs`: an error while producing ``rows`` leaves any existing
    ``path`` untouched and no partial file, a folder that cannot be written or a full disk is one line
    naming ``path``. ``keep_empty=False``: no rows write nothing (an existing ``path`` is left as it
    was), for commands that fail when they have nothing to write.
    """
    check_output_path(path)
    if not keep_empty:
        rows = iter(rows)
        first = next(rows, None)
        if first is None:
            return 0
        rows = itertools.chain([first], rows)
    with atomic_outputs(path) as (tmp,):
        return write_rows_to(tmp, path, rows)


@contextmanager
def atomic_outputs(*paths: str | os.PathLike):
    """Temporary paths for the output files ``paths`` (their folders made), each renamed onto its file
    only when the block has written them all: a failure leaves every output as it was and no partial
    file (:func:`preftune.common.files.atomic_path`; new files get the mode ``open(path, "w")`` would
    give them). A folder that cannot be written or a full disk raises one line naming the output
    (``CannotWriteError`` / ``DiskFullError``, both ``ValueError``)."""
    with ExitStack() as stack:
        temps = []
        for path in paths:
            target = Path(path).expanduser()
            with write_guard(target):
                target.parent.mkdir(parents=True, exist_ok=True)
            temps.append(stack.enter_context(atomic_path(target)))
        yield temps


def write_rows_to(tmp: Path, path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write ``rows`` into ``tmp`` in the format ``path``'s name says (:func:`write_rows`); the count.
    A failed write names ``path`` (its own guard: with several outputs open, the one that failed)."""
    name = os.fspath(path).lower()
    with write_guard(Path(path).expanduser()):
        if name.endswith(".parquet"):
            return _write_parquet(str(tmp), rows)
        opener = gzip.open if name.endswith(".gz") else open
        count = 0
        with opener(tmp, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                count += 1
        return count


def _write_parquet(path: str, rows: Iterable[dict]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows))
    pq.write_table(table, path)
    return table.num_rows

