"""The one record schema every data file is read into, before and after tokenization.

Flow: file -> raw dict rows (``readers``) -> :class:`Example` (``formats``)
-> :class:`TokenizedExample` (``tokenize``) -> :class:`preftune.data.batch.Batch` (``collate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list]  # plain text, or a list of chat messages


@dataclass(frozen=True)
class Location:
    """Where a record came from, for error messages: ``pairs.jsonl:17`` or ``data.parquet row 4``."""

    path: str
    line: int | None = None  # 1-based line for JSON Lines / JSON arrays (element number)
    row: int | None = None  # 0-based row for Parquet / datasets

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path} row {self.row}"
        return self.path


@dataclass
class Example:
    """One training example in the common schema (not yet tokenized).

    kind = "pair":     prompt, chosen, rejected             (DPO family, ORPO, SimPO)
    kind = "unpaired": prompt, completion, label (bool)     (KTO)
    kind = "sft":      prompt, completion                   (SFT)
    kind = "group":    prompt, responses (k >= 2), scores   (group losses; higher score = better)

    ``prompt``/completions are either all plain strings, or all lists of chat messages
    (``{"role", "content"}``); a messages prompt is rendered with the tokenizer's chat
    template with the generation prompt added.
    """

    kind: str
    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None
    completion: Text | None = None
    label: bool | None = None
    location: Location | None = None
    prompt_source: str = "explicit"  # "explicit" | "implicit" | "messages"
    margin: float | None = None  # pairs: the optional ``margin`` field (reward models)
    responses: list | None = None  # groups: the k responses (texts, or lists of messages)
    scores: list[float] | None = None  # groups: one finite score per response, higher = better

    @property
    def completion_texts(self) -> list:
        """The completions in tokenization order: ``[chosen, rejected]`` for a pair, the ``responses``
        of a group, ``[completion]`` otherwise."""
        if self.kind == "pair":
            return [self.chosen, self.rejected]
        if self.kind == "group":
            return list(self.responses)
        return [self.completion]

    def with_completions(self, completions: list) -> "Example":
        """A copy whose completions (in :attr:`completion_texts` order) are ``completions``."""
        if self.kind == "pair":
            return dataclasses.replace(self, chosen=completions[0], rejected=completions[1])
        if self.kind == "group":
            return dataclasses.replace(self, responses=list(completions))
        return dataclasses.replace(self, completion=completions[0])


@dataclass
class TokenizedExample:
    """Token ids of one example, boundary exact: ``prompt_ids + completions[k]`` are the
    ids of the full rendered text (no double BOS; EOS appended to plain-text completions).

    ``completions`` is ``[chosen_ids, rejected_ids]`` for pairs, the k responses' ids for a
    group (``scores``: one per response, higher = better) and ``[completion_ids]`` for SFT and
    KTO. ``index`` is the example's position in its dataset and keys the reference log-prob cache.
    """

    index: int
    prompt_ids: list[int]
    completions: list[list[int]]
    label: bool | None = None
    location: Location | None = None
    truncated: bool = False
    margin: float | None = None  # pairs: the optional ``margin`` field (reward models)
    scores: list[float] | None = None  # groups: one score per completion, higher = better

    @property
    def num_tokens(self) -> int:
        """Tokens in the prefix-shared layout (prompt once, each completion once)."""
        return len(self.prompt_ids) + sum(len(c) for c in self.completions)

    @property
    def padded_tokens(self) -> int:
        """Tokens in the plain layout (prompt repeated for each completion)."""
        return sum(len(self.prompt_ids) + len(c) for c in self.completions)
