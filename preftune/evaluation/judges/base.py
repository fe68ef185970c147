"""What every judge is: who wrote the better response, "a" or "b"?

Every judge has ``compare(prompts, responses_a, responses_b) -> CompareResult`` with one
outcome per item: 1 (a wins), 0 (b wins), 0.5 (tie). *Scoring* judges (``python:``,
``reward-model:``) also have ``score(prompts, responses) -> list[float]`` and compare by score
(equal scores tie). Prompts are plain strings or chat message lists
(``[{"role": ..., "content": ...}]``); see :func:`prompt_text`.

The kinds of judge live beside this module (:mod:`.python`, :mod:`.reward_model`, :mod:`.openai`);
:func:`preftune.evaluation.judges.registry.make_judge` builds one from its spec string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from preftune.data.messages import is_messages, messages_text
from preftune.evaluation.metrics import LOSS, TIE, WIN, WinRate, win_rate

Prompt = Union[str, list]  # plain text, or a list of {"role", "content"} messages


class JudgeError(RuntimeError):
    """A judge could not do its job at all (bad credentials, server unreachable, ...)."""


@dataclass
class CompareResult:
    """Per-item outcomes of a comparison plus what went wrong along the way.

    ``outcomes[i]`` is 1.0 (a wins), 0.0 (b wins) or 0.5 (tie). ``ties`` counts every 0.5,
    whatever its cause; ``inconsistent``, ``unparseable`` and ``errors`` count the items
    made a tie because the two orders disagreed, a verdict could not be read, or a request
    failed (always 0 for scoring judges).
    """

    outcomes: list[float]
    ties: int = 0
    inconsistent: int = 0
    unparseable: int = 0
    errors: int = 0

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def wins(self) -> int:
        return sum(o == WIN for o in self.outcomes)

    @property
    def losses(self) -> int:
        return sum(o == LOSS for o in self.outcomes)

    def win_rate(self, confidence: float = 0.95) -> WinRate:
        """Win rate of "a" over "b" with a Wilson interval (:func:`preftune.evaluation.metrics.win_rate`)."""
        return win_rate(self.outcomes, confidence)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: strings unchanged, message lists as ``role: content`` blocks."""
    if isinstance(prompt, str) or is_messages(prompt):
        return messages_text(prompt)
    raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")


def check_lengths(**lists: Sequence) -> int:
    """The common length of the given lists; ValueError naming them when they differ."""
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lists must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


class Judge:
    """Base class: ``compare`` is the one method every judge has.

    A kind of judge that :func:`~preftune.evaluation.judges.registry.make_judge` builds also has
    ``spec_form`` (its spec as the error for an unknown spec lists it) and ``from_spec(spec, **options)``.
    """

    spec: str = ""
    spec_form: str = ""

    @classmethod
    def from_spec(cls, spec: str, **options) -> "Judge":
        """The judge of ``spec`` (``KIND:REST``); ``options`` go to the constructor."""
        raise NotImplementedError

    def compare(self, prompts: Sequence[Prompt], responses_a: Sequence[str],
                responses_b: Sequence[str]) -> CompareResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class ScoringJudge(Judge):
    """A judge that gives each response a number; it compares two responses by their scores."""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts, responses_a, responses_b) -> CompareResult:
        n = check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        # One score call over a and b together, so batched judges batch across both. A response b that is
        # word for word a's is not scored again: it has a's score (a tie, whatever batch it would be scored in).
        other = [i for i in range(n) if responses_b[i] != responses_a[i]]
        scores = self.score(list(prompts) + [prompts[i] for i in other],
                            list(responses_a) + [responses_b[i] for i in other])
        scores_b = list(scores[:n])
        for i, value in zip(other, scores[n:]):
            scores_b[i] = value
        return compare_scores(scores[:n], scores_b)

    def cache_parts(self) -> dict | None:
        """What this judge's scores depend on besides the prompt and response (for a cache key such as
        :class:`preftune.evaluation.base_cache.BaseCache`'s), or None: its scores are not to be cached."""
        return None


def compare_scores(scores_a: Sequence[float], scores_b: Sequence[float]) -> CompareResult:
    """Outcomes of a vs b item by item: the higher score wins, equal scores tie."""
    check_lengths(scores_a=scores_a, scores_b=scores_b)
    outcomes = [WIN if sa > sb else LOSS if sa < sb else TIE for sa, sb in zip(scores_a, scores_b)]
    return CompareResult(outcomes=outcomes, ties=sum(o == TIE for o in outcomes))
