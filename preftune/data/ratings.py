"""Scored responses -> preference pairs, KTO rows or response groups: ``score_pairs(src, dst, score_field=...)``.

For rows holding several rated responses per prompt, with no people in the loop:

* **nested** rows, one prompt and a list of responses each with a score — UltraFeedback's raw
  ``{"instruction", "completions": [{"response", "overall_score", ...}]}``, or ``{"prompt",
  "responses": [texts], "scores": [numbers]}`` (parallel lists);
* **flat** rows, one response each, grouped by their prompt text or by an id field
  (``group_by="conversation_id"``) — CSAT or thumbs logs: ``{"conversation_id", "prompt",
  "response", "csat": 4}``.

Scores are numbers, numeric strings, booleans or ``up`` / ``down`` (``good`` / ``bad``, ...);
``score_field`` may be a dotted path (``annotations.helpfulness.Rating``).

Strategies for pairs (within a group; equal scores are ties, never pairs):

* ``best-worst`` — the highest against the lowest score (the first of equal ones), when they differ
  by at least ``margin`` (default: any difference);
* ``all`` — every pair of responses whose scores differ by at least ``margin``;
* ``best-random`` — the best against one response drawn (seeded per group) from those scoring at
  least ``margin`` below it.

``to="kto"`` labels each response by ``threshold``: ``score >= threshold`` is desirable,
``score < reject_below`` (default: the threshold) undesirable, scores in between are dropped.

``to="groups"`` writes each prompt's scored responses as one response group ``{"prompt",
"responses", "scores"}`` (in file order, ties kept: the group losses skip tied pairs); a prompt with
fewer than 2 scored responses is dropped. ``strategy`` and ``margin`` choose pairs, so they are refused
with groups.

Everything left out is counted by reason; rows that cannot be read are counted as bad records with
their ``file:line``. The output is what ``preftune train`` reads (``prompt`` / ``chosen`` /
``rejected`` with ``score_chosen`` / ``score_rejected``, ``prompt`` / ``completion`` / ``label``, or a
response group ``prompt`` / ``responses`` / ``scores``).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from itertools import combinations

from preftune.data.convert import check_output_path, write_rows
from preftune.data.errors import DataError, count_bad_record
from preftune.data.readers import read_rows
from preftune.data.records import Location

STRATEGIES = ("best-worst", "all", "best-random")
TARGETS = ("pairs", "kto", "groups")
PROMPT_FIELDS = ("prompt", "instruction", "question", "query", "input")
RESPONSE_FIELDS = ("response", "completion", "text", "output", "answer", "content")
LIST_FIELDS = ("completions", "responses", "answers", "outputs", "candidates")
WORD_SCORES = {"up": 1.0, "down": 0.0, "thumbs_up": 1.0, "thumbs_down": 0.0, "good": 1.0, "bad": 0.0,
               "positive": 1.0, "negative": 0.0, "yes": 1.0, "no": 0.0, "true": 1.0, "false": 0.0}


@dataclass
class Scored:
    response: str | list
    score: float
    location: Location


@dataclass
class Group:
    key: str
    prompt: str | list
    responses: list[Scored] = field(default_factory=list)


@dataclass
class PairsResult:
    """What :func:`score_pairs` did; ``dropped`` counts by reason (groups, responses or pairs, as named)."""

    source: str
    destination: str
    target: str
    strategy: str
    rows_read: int = 0
    bad_records: int = 0
    bad_record_samples: list[str] = field(default_factory=list)
    responses: int = 0  # scored responses read
    groups: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        what = {"kto": "KTO rows", "groups": "response groups"}.get(self.target, f"pairs ({self.strategy})")
        line = (f"{self.rows_read} rows, {self.responses} scored responses in {self.groups} groups -> "
                f"{self.written} {what} written to {self.destination}; {self.bad_records} bad records")
        if self.dropped:
            line += "; dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        if self.bad_record_samples:
            line += f"; first bad: {self.bad_record_samples[0]}"
        return line

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


def score_pairs(src: str | os.PathLike, dst: str | os.PathLike, score_field: str, to: str = "pairs",
                strategy: str = "best-worst", margin: float = 0.0, threshold: float | None = None,
                reject_below: float | None = None, group_by: str = "prompt", prompt_field: str | None = None,
                responses_field: str | None = None, response_field: str | None = None,
                seed: int = 0) -> PairsResult:
    """Read ``src``, group its scored responses, and write pairs (KTO rows, response groups) to ``dst``.

    ``ValueError`` for a bad option (a ``margin`` that is negative or not finite, ...);
    ``CannotWriteError`` / ``DiskFullError`` (``ValueError``) naming ``dst`` when it cannot be written.
    No row to write: ``dst`` is not written (an existing file is left as it was)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"--margin must be a finite number >= 0, got {margin}")
    for flag, value in (("--threshold", threshold), ("--reject-below", reject_below)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
    if to == "kto":
        if threshold is None:
            raise ValueError("--to kto needs --threshold T (score >= T is a desirable response)")
        reject_below = threshold if reject_below is None else reject_below
        if reject_below > threshold:
            raise ValueError(f"--reject-below ({reject_below}) must not be above --threshold ({threshold})")
    if to == "groups" and (strategy != "best-worst" or margin):
        flag = f"--strategy {strategy}" if strategy != "best-worst" else f"--margin {margin:g}"
        raise ValueError(f"{flag} chooses pairs; --to groups writes every scored response of a prompt "
                         "(ties kept)")
    check_output_path(dst, src)
    result = PairsResult(source=os.fspath(src), destination=os.fspath(dst), target=to, strategy=strategy)
    groups = read_groups(src, score_field, group_by, prompt_field, responses_field, response_field, result)
    result.groups = len(groups)
    if to == "kto":
        rows = [row for group in groups for row in kto_rows(group, threshold, reject_below, result)]
    elif to == "groups":
        rows = [row for group in groups for row in group_rows(group, result)]
    else:
        rows = [row for group in groups for row in pair_rows(group, strategy, margin, seed, result)]
    result.written = write_rows(dst, rows, keep_empty=False)
    return result


# ----------------------------------------------------------------------------- reading


def read_groups(src, score_field: str, group_by: str, prompt_field: str | None, responses_field: str | None,
                response_field: str | None, result: PairsResult) -> list[Group]:
    """Every scored response of ``src``, grouped (groups in order of first appearance)."""
    groups: dict[str, Group] = {}

    def on_bad(err: DataError) -> None:
        result.rows_read += 1
        count_bad_record(result, err)

    for location, row in read_rows(src, on_bad_record=on_bad):
        result.rows_read += 1
        try:
            prompt = _prompt(row, prompt_field, location)
            key = _group_key(row, prompt, group_by, location)
            scored = _responses(row, score_field, responses_field, response_field, location, result)
        except DataError as err:
            count_bad_record(result, err)
            continue
        group = groups.setdefault(key, Group(key=key, prompt=prompt))
        if group_by != "prompt" and prompt != group.prompt:
            result.drop("rows whose prompt differs from their group's first (first prompt used)")
        group.responses.extend(scored)
        result.responses += len(scored)
    return list(groups.values())


def _prompt(row: dict, prompt_field: str | None, location: Location) -> str | list:
    names = [prompt_field] if prompt_field else [n for n in PROMPT_FIELDS if n in row]
    if not names or names[0] not in row:
        raise DataError(location, f"no prompt field ({prompt_field or ' / '.join(PROMPT_FIELDS)}); "
                                  "name it with --prompt-field")
    return _text(row[names[0]], names[0], location)


def _group_key(row: dict, prompt, group_by: str, location: Location) -> str:
    if group_by == "prompt":
        return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    value = get_path(row, group_by)
    if value is None or isinstance(value, (dict, list)):
        raise DataError(location, f"group field {group_by!r} is missing or not a plain value")
    return f"{type(value).__name__}:{value}"


def _responses(row: dict, score_field: str, responses_field: str | None, response_field: str | None,
               location: Location, result: PairsResult) -> list[Scored]:
    list_name = responses_field or next((n for n in LIST_FIELDS if isinstance(row.get(n), list)), None)
    if responses_field and not isinstance(row.get(responses_field), list):
        raise DataError(location, f"field {responses_field!r} is missing or not a list")
    if list_name is None:  # flat: one response per row
        name = _response_name(row, response_field, location)
        score = parse_score(get_path(row, score_field))
        if score is None:
            result.drop("responses without a numeric score")
            return []
        return _usable([Scored(_text(row[name], name, location), score, location)], result)
    items = row[list_name]
    parallel = get_path(row, score_field)
    scored = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            name = _response_name(item, response_field, location, f"{list_name}[{i}]")
            response, score = _text(item[name], f"{list_name}[{i}].{name}", location), get_path(item, score_field)
        elif isinstance(parallel, list) and len(parallel) == len(items):
            response, score = _text(item, f"{list_name}[{i}]", location), parallel[i]
        else:
            raise DataError(location, f"{list_name}[{i}] is not an object and {score_field!r} is not a list of "
                                      f"{len(items)} scores beside it")
        value = parse_score(score)
        if value is None:
            result.drop("responses without a numeric score")
            continue
        scored.append(Scored(response, value, location))
    return _usable(scored, result)


def _usable(scored: list[Scored], result: PairsResult) -> list[Scored]:
    kept = [s for s in scored if (s.response if isinstance(s.response, str)
                                  else "".join(m.get("content", "") for m in s.response)).strip()]
    result.drop("empty responses", len(scored) - len(kept))
    return kept


def _response_name(item: dict, response_field: str | None, location: Location, where: str = "row") -> str:
    if response_field:
        if response_field not in item:
            raise DataError(location, f"{where}: field {response_field!r} is missing")
        return response_field
    name = next((n for n in RESPONSE_FIELDS if n in item), None)
    if name is None:
        raise DataError(location, f"{where}: no response field ({' / '.join(RESPONSE_FIELDS)}); name it with "
                                  "--response-field")
    return name


def _text(value, name: str, location: Location) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return value
    raise DataError(location, f"field {name!r} must be text or a list of {{role, content}} messages")


def get_path(row: dict, path: str):
    """``row["a"]["b"]`` for ``"a.b"`` (a key holding the dots itself wins); None when missing."""
    if path in row:
        return row[path]
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_score(value) -> float | None:
    """A score as a float: numbers, booleans, numeric strings, up/down words; None otherwise (NaN too)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in WORD_SCORES:
            return WORD_SCORES[word]
        try:
            number = float(word)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------- pairs and KTO rows


def pair_rows(group: Group, strategy: str, margin: float, seed: int, result: PairsResult) -> list[dict]:
    """The pairs of one group by ``strategy`` (see the module docstring)."""
    responses = group.responses
    if len(responses) < 2:
        result.drop("groups with fewer than 2 scored responses")
        return []
    if strategy == "all":
        rows = []
        for a, b in combinations(responses, 2):
            if a.score == b.score:
                result.drop("tied pairs")
            elif abs(a.score - b.score) < margin:
                result.drop(f"pairs under margin {margin:g}")
            elif a.response == b.response:
                result.drop("pairs of identical texts")
            else:
                rows.append(_pair(group, *((a, b) if a.score > b.score else (b, a))))
        return rows
    best = max(responses, key=lambda s: s.score)  # max / min keep the first of equal scores
    if strategy == "best-worst":
        worst = min(responses, key=lambda s: s.score)
        if best.score == worst.score:
            result.drop("groups whose scores all tie")
            return []
        if best.score - worst.score < margin:
            result.drop(f"groups under margin {margin:g}")
            return []
        if best.response == worst.response:
            result.drop("pairs of identical texts")
            return []
        return [_pair(group, best, worst)]
    below = [s for s in responses if s.score < best.score and best.score - s.score >= margin
             and s.response != best.response]
    if not below:
        result.drop(f"groups with no response below the best by {margin:g} or more" if margin
                    else "groups whose scores all tie")
        return []
    rng = random.Random(f"{seed}\0{group.key}")  # per group: the same pairs whatever the file order
    return [_pair(group, best, rng.choice(below))]


def kto_rows(group: Group, threshold: float, reject_below: float, result: PairsResult) -> list[dict]:
    rows = []
    for scored in group.responses:
        if scored.score >= threshold:
            label = True
        elif scored.score < reject_below:
            label = False
        else:
            result.drop("responses between --reject-below and --threshold")
            continue
        rows.append({"prompt": group.prompt, "completion": scored.response, "label": label, "score": scored.score})
    return rows


def group_rows(group: Group, result: PairsResult) -> list[dict]:
    """One group's response group ``{"prompt", "responses", "scores"}`` (what ``preftune train`` reads as
    kind "group"), or nothing when it has fewer than 2 scored responses."""
    if len(group.responses) < 2:
        result.drop("groups with fewer than 2 scored responses")
        return []
    return [{"prompt": group.prompt, "responses": [s.response for s in group.responses],
             "scores": [s.score for s in group.responses]}]


def _pair(group: Group, chosen: Scored, rejected: Scored) -> dict:
    return {"prompt": group.prompt, "chosen": chosen.response, "rejected": rejected.response,
            "score_chosen": chosen.score, "score_rejected": rejected.score}
