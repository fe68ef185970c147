"""What reading a data source did: rows read, examples kept, records bad, truncated or dropped."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataReport:
    """What :func:`preftune.data.load.load_dataset` did. For ``kind="pair"``:
    ``rows_read == examples_kept + bad_records + dropped``.
    """

    source: str
    kind: str
    rows_read: int = 0  # records met in the source, bad ones included (up to ``limit``)
    examples_kept: int = 0  # tokenized examples returned
    groups_kept: int = 0  # of them, response groups (a pair-kind read of a groups file gives groups)
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
        line = (f"{self.rows_read} rows -> {self._kept()}"
                f"{f' ({sources})' if sources else ''}; {self.bad_records} bad, {self.truncated} truncated, "
                f"{self.dropped} dropped (no room for a completion under max_length)")
        if self.template_mismatches:
            line += f"; {self.template_mismatches} chat-template prompt mismatches (completions cut after the common prefix)"
        if self.bad_record_samples:
            line += f"; first bad: {self.bad_record_samples[0]}"
        return line

    def _kept(self) -> str:
        """The kept examples in words: ``"8 groups"`` for response groups (a groups file, whether read as
        "group" or as "pair"), ``"5 pair examples and 3 groups"`` for a file mixing both, else
        ``"N <kind> examples"``."""
        others = self.examples_kept - self.groups_kept
        if self.kind == "group" or (self.groups_kept and not others):
            return f"{self.examples_kept} groups"
        if self.groups_kept:
            return f"{others} {self.kind} examples and {self.groups_kept} groups"
        return f"{self.examples_kept} {self.kind} examples"
