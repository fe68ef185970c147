"""``preftune iterate``'s judge cache: every verdict a round asks for is kept on disk, so a resumed run never
pays for a judge call twice (paid endpoints), and a judge that fails says which prompt it failed on.

:func:`cached_judge` wraps a judge in :class:`CachedScoringJudge` (``python:``, ``reward-model:``: a score per
``(judge spec, prompt, response)``) or :class:`CachedPairwiseJudge` (``openai:``: an outcome per
``(judge spec, prompt, response a, response b)``). The cache is a JSONL file in the round's folder, one
``{"key", "value"}`` line per verdict (the key also covers what the judge's verdicts depend on besides its
spec: a reward model's weights, :meth:`~preftune.evaluation.judges.base.ScoringJudge.cache_parts`), appended
and fsync'ed after each prompt's verdicts: a run killed mid-judging keeps every prompt judged before; a torn
last line is ignored. The judge is asked one prompt's verdicts at a time (all its responses, or all its
round-robin games), so a failure (an exception of any kind, or an ``openai:`` comparison whose requests failed
after their retries: a tie to that judge, not a verdict to keep) becomes one
:class:`~preftune.evaluation.judges.base.JudgeError` line naming the prompt, and the round stays resumable.
The price: a reward model scores one prompt's responses per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from preftune.evaluation.judges.base import CompareResult, Judge, JudgeError, ScoringJudge, prompt_text
from preftune.evaluation.metrics import TIE


class _Cache:
    """The verdicts of one judge in one JSONL file; ``calls`` counts the verdicts the wrapped judge gave."""

    def __init__(self, judge: Judge, path: Path, where: str):
        self.judge, self.path, self.where = judge, Path(path), where
        self.values: dict[str, float] = {}
        self.calls = 0
        self.identity: list | None = None  # the judge: its spec and what its verdicts depend on
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["key"]] = float(row["value"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line (killed mid-write): the verdicts before it stand

    def key(self, *parts) -> str:
        if self.identity is None:  # a reward model's weights fingerprint, computed on the first key
            parts_of = getattr(self.judge, "cache_parts", None)
            self.identity = [self.judge.spec or repr(self.judge), (parts_of() if parts_of else None)]
        text = json.dumps([*self.identity, *parts], ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, pairs: list[tuple[str, float]]) -> None:
        """Keep ``(key, value)`` pairs in memory and append them to the file (flushed and fsync'ed)."""
        self.values.update(pairs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in pairs))
            fh.flush()
            os.fsync(fh.fileno())

    def ask(self, groups: dict[int, list[int]], prompts: Sequence, keys: list[str], call) -> None:
        """For each prompt's list of item indices in ``groups`` (the items not cached), ``call(items)`` -> one
        value per item, kept (appended to the file) after each prompt. One call per prompt, so a failure names
        its prompt (a JudgeError) and no verdict is ever asked twice."""
        kept_before = len(self.values)
        for group in groups.values():
            try:
                values = call(group)
            except Exception as err:  # noqa: BLE001 - any judge failure: one line naming the prompt
                raise JudgeError(
                    f"{self.where}: judge {self.judge.spec or self.judge!r} failed on prompt "
                    f"{prompt_text(prompts[group[0]]).splitlines()[0]!r:.80} ({type(err).__name__}: {err}); "
                    f"the {len(self.values) - kept_before} verdicts asked before it are kept in {self.path}: "
                    "rerun the same command with --resume to go on") from err
            self.keep(keys, group, values)

    def keep(self, keys: list[str], items: list[int], values) -> None:
        values = [float(v) for v in values]
        self.calls += len(items)
        self.add([(keys[i], v) for i, v in zip(items, values)])


def _groups(prompts: Sequence, keys: list[str], cached: dict) -> dict[int, list[int]]:
    """The indices of the items not in ``cached`` (the first of equal keys), grouped by their prompt (first-seen
    order)."""
    groups: dict[str, list[int]] = {}
    asked: set[str] = set()  # a response given twice is judged once
    for i, (prompt, key) in enumerate(zip(prompts, keys)):
        if key not in cached and key not in asked:
            asked.add(key)
            groups.setdefault(json.dumps(prompt), []).append(i)
    return dict(enumerate(groups.values()))


class CachedScoringJudge(ScoringJudge):
    """A scoring judge whose scores are cached by ``(judge spec, prompt, response)``."""

    def __init__(self, judge: ScoringJudge, path: Path, where: str):
        self.cache = _Cache(judge, path, where)
        self.spec = judge.spec

    @property
    def calls(self) -> int:
        return self.cache.calls

    def score(self, prompts, responses) -> list[float]:
        keys = [self.cache.key(p, r) for p, r in zip(prompts, responses)]
        inner = self.cache.judge
        self.cache.ask(_groups(prompts, keys, self.cache.values), prompts, keys,
                       lambda items: inner.score([prompts[i] for i in items], [responses[i] for i in items]))
        return [self.cache.values[k] for k in keys]


class CachedPairwiseJudge(Judge):
    """A pairwise judge whose outcomes are cached by ``(judge spec, prompt, response a, response b)``."""

    def __init__(self, judge: Judge, path: Path, where: str):
        self.cache = _Cache(judge, path, where)
        self.spec = judge.spec

    @property
    def calls(self) -> int:
        return self.cache.calls

    def compare(self, prompts, responses_a, responses_b) -> CompareResult:
        keys = [self.cache.key(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
        inner = self.cache.judge

        def call(items: list[int]) -> list[float]:
            result = inner.compare([prompts[i] for i in items], [responses_a[i] for i in items],
                                   [responses_b[i] for i in items])
            if result.errors:  # a failed request is a tie to the judge; not a verdict to keep
                raise JudgeError(f"{result.errors} of its {len(items)} comparisons failed after the judge's retries")
            return result.outcomes

        self.cache.ask(_groups(prompts, keys, self.cache.values), prompts, keys, call)
        outcomes = [self.cache.values[k] for k in keys]
        return CompareResult(outcomes=outcomes, ties=sum(o == TIE for o in outcomes))


def cached_judge(judge: Judge, path: Path, where: str) -> CachedScoringJudge | CachedPairwiseJudge:
    """``judge`` with its verdicts cached in ``path`` (``where``: what the failure line starts with)."""
    if isinstance(judge, ScoringJudge):
        return CachedScoringJudge(judge, path, where)
    return CachedPairwiseJudge(judge, path, where)
