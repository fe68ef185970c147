"""The data doctor's checks of response groups (``{"prompt", "responses", "scores"}`` records).

* group sizes: how many responses per prompt (k), as a count per k;
* all-tied groups: every response scored the same, so the group holds no ordered pair to learn from;
* duplicate responses: two responses of one group equal after
  :func:`~preftune.data.split.normalize_text` (a tie with itself, or a contradiction when scored apart);
* length bias of the best response: of the comparisons of a group's best-scored response with each
  lower-scored one that differ in length, the share where the best is longer (warned outside 40-60%, as
  the pairs' length bias: a model can win by length alone).

:class:`GroupChecks` collects these over the doctor's one read; it keeps a few numbers per group, not
the groups.
"""

from __future__ import annotations

from array import array

from preftune.data.doctor_report import Finding, length_bias_finding
from preftune.data.records import Example

GROUP_SIZES, TIED, DUPLICATE_RESPONSES = "group sizes", "all-tied groups", "duplicate responses"
BEST_LENGTH_BIAS = "length bias"
MAX_LOCATIONS = 5


class GroupChecks:
    """Group sizes, ties, duplicate responses and the best response's length, added group by group."""

    def __init__(self):
        self.sizes: dict[int, int] = {}
        self.tied = Finding(TIED, "ok", "")
        self.duplicates = Finding(DUPLICATE_RESPONSES, "ok", "")
        self.chars: list[array] = []  # per group: prompt, then each response, in characters
        self.tokens: list[array] = []  # the same in tokens, when tokenized
        self.best = {"chars": [0, 0], "tokens": [0, 0]}  # [best longer, best shorter] per unit

    def add(self, example: Example, normalised: list[str], chars: list[int], tokens: list[int] | None) -> None:
        """One group: its normalised texts (prompt first), and its lengths (prompt first) in characters
        and, when tokenized, tokens."""
        where = str(example.location)
        scores = example.scores
        self.sizes[len(scores)] = self.sizes.get(len(scores), 0) + 1
        if len(set(scores)) == 1:
            _note(self.tied, where)
        first: dict[str, int] = {}
        for i, text in enumerate(normalised[1:]):
            if text in first:
                _note(self.duplicates, f"{where} (responses {first[text] + 1} and {i + 1})")
                break
            first[text] = i
        self.chars.append(array("l", chars))
        if tokens is not None:
            self.tokens.append(array("l", tokens))
        for unit, lengths in (("chars", chars), ("tokens", tokens)):
            if lengths is not None:
                _count_best(self.best[unit], scores, lengths[1:])

    def lengths(self, exact: bool) -> list[array]:
        """Per group ``[prompt, response_0, ...]``: tokens when ``exact``, else characters / 4 (rounded up)."""
        if exact:
            return self.tokens
        return [array("l", ((n + 3) // 4 for n in lengths)) for lengths in self.chars]

    def findings(self, exact: bool) -> list[Finding]:
        """The four group findings, in report order; ``exact``: lengths in tokens (else characters)."""
        groups = sum(self.sizes.values())
        sizes = ", ".join(f"k={k}: {n}" for k, n in sorted(self.sizes.items()))
        found = [Finding(GROUP_SIZES, "ok", f"responses per prompt: {sizes or 'no groups'}",
                         sum(k * n for k, n in self.sizes.items()))]
        self.tied.severity = "warning" if self.tied.count else "ok"
        self.tied.message = (f"every response scored the same ({self.tied.count} of {groups} groups): no ordered "
                             "pair to learn from" if self.tied.count else "every group orders some responses")
        self.duplicates.severity = "warning" if self.duplicates.count else "ok"
        self.duplicates.message = "two responses of one group equal once lowercased, punctuation dropped, " \
                                  "whitespace collapsed"
        found += [self.tied, self.duplicates]
        longer, shorter = self.best["tokens" if exact else "chars"]
        found.append(_bias(longer, shorter, "tokens" if exact else "characters"))
        return found


def _count_best(counts: list[int], scores: list[float], lengths: list[int]) -> None:
    """Add to ``counts`` ([longer, shorter]) each comparison of a top-scored response with a lower one."""
    top = max(scores)
    for i, score in enumerate(scores):
        if score != top:
            continue
        for j, other in enumerate(scores):
            if other < top and lengths[i] != lengths[j]:
                counts[0 if lengths[i] > lengths[j] else 1] += 1


def _bias(longer: int, shorter: int, unit: str) -> Finding:
    if longer + shorter == 0:
        return Finding(BEST_LENGTH_BIAS, "ok", "no best response differs in length from a lower-scored one", 0)
    share = longer / (longer + shorter)
    return length_bias_finding(BEST_LENGTH_BIAS, longer, shorter,
                               f"best response longer in {share:.1%} of its comparisons with a lower-scored response "
                               f"that differ in length ({longer} longer, {shorter} shorter, in {unit})")


def _note(finding: Finding, where: str) -> None:
    finding.count += 1
    if len(finding.locations) < MAX_LOCATIONS:
        finding.locations.append(where)
