"""The data doctor: every problem in a data file, found in one read, before a run trips on it.

``check_data(path)`` reads the whole file through the same path ``preftune train`` uses
(``read_rows`` -> ``to_example`` -> ``tokenize_examples``) but never stops at a bad record: each
one is counted under its kind with its ``file:line``. The report
(:class:`~preftune.data.doctor_report.DoctorReport`) holds one ``Finding`` per check, each ``ok`` /
``warning`` / ``error``. *Errors* are what makes ``preftune train`` stop (bad records; it needs
``--skip-bad-records``) or makes its numbers meaningless (held-out prompts that are also trained
on); *warnings* are what quietly makes a run worse (too few pairs, duplicates, a length bias,
truncation).

Definitions:

* exact duplicate: same prompt, chosen and rejected (same prompt and completion and label for
  KTO) as an earlier record;
* near duplicate: not exact, but equal after :func:`~preftune.data.split.normalize_text` on the
  prompt and every response (lowercase, punctuation removed, whitespace collapsed);
* conflicting pair: an earlier record holds the same pair the other way round (normalised), or
  the same KTO completion with the opposite label;
* length bias: the share of pairs whose chosen response is longer than the rejected, of those
  that differ in length (a model can win DPO by length alone; warned outside 40-60%);
* train/eval leak: a record whose normalised prompt is also in ``eval_path``;
* response groups (``{"prompt", "responses", "scores"}``): group sizes, all-tied groups, duplicate
  responses and the best response's length bias (:mod:`preftune.data.doctor_groups`); exact and near
  duplicates compare the prompt, every response and the scores.

Lengths are in tokens with a tokenizer (prompt with its BOS, responses with EOS, as training
counts them); without one they are approximate tokens, characters / 4, and say so.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path

from preftune.data.convert import detect_kind
from preftune.data.doctor_groups import GroupChecks
from preftune.data.doctor_report import NOUNS, DoctorReport, Finding, LengthStats, length_bias_finding
from preftune.data.errors import DataError
from preftune.data.formats import ASSISTANT_MARKER, is_group_row, to_example
from preftune.data.messages import messages_text
from preftune.data.readers import read_rows
from preftune.data.records import Example, Location
from preftune.data.report import DataReport
from preftune.data.split import normalize_text, prompt_key
from preftune.data.tokenize import tokenize_examples

MIN_PAIRS = 1000  # fewer gives noisy, easily overfitted preference runs (practical minimum 1K-5K)
CHARS_PER_TOKEN = 4
MAX_LOCATIONS = 5
CHUNK = 512  # examples tokenized at a time
HUMAN_MARKER = "\n\nHuman:"

# The checks, in report order.
SIZE, BAD, PROMPT_SPLIT, EMPTY = "size", "bad records", "prompt extraction", "empty responses"
IDENTICAL, EXACT, NEAR, CONFLICT = "identical pairs", "exact duplicates", "near duplicates", "conflicting pairs"
MARKERS, LABELS, BIAS = "turn markers in responses", "labels", "length bias"
TRUNCATED, DROPPED, LEAK, TOKENIZER = "truncated", "dropped", "train/eval leak", "tokenizer"
_RECORD_PROBLEMS = (BAD, PROMPT_SPLIT, EMPTY, IDENTICAL)


def check_data(path: str | os.PathLike, tokenizer=None, max_length: int | None = None,
               max_prompt_length: int | None = None, eval_path: str | os.PathLike | None = None) -> DoctorReport:
    """Read all of ``path`` and report every problem (see the module docstring).

    ``tokenizer`` (a loaded one, e.g. :func:`preftune.model.loading.load_tokenizer_as_is`) gives exact
    token lengths; ``max_length`` / ``max_prompt_length`` count the pairs training would truncate or drop;
    ``eval_path`` checks for prompts shared with a held-out file. Raises :class:`DataError` only
    when ``path`` (or ``eval_path``) cannot be opened at all.
    """
    eval_prompts = _eval_prompts(eval_path) if eval_path is not None else None
    doctor = _Doctor(os.fspath(path), tokenizer, eval_prompts)
    doctor.read()
    return doctor.report(max_length, max_prompt_length, eval_path)


def truncation_outcome(prompt_len: int, completion_lens: list[int], max_length: int | None,
                       max_prompt_length: int | None) -> str:
    """``"kept"``, ``"truncated"`` or ``"dropped"``: the rule of ``preftune.data.tokenize.assemble``
    (keep the prompt's end, then cut completions to fit, or drop if no completion token fits)."""
    truncated = False
    if max_prompt_length is not None and prompt_len > max_prompt_length:
        prompt_len, truncated = max_prompt_length, True
    if max_length is not None:
        room = max_length - prompt_len
        if room < 1:
            return "dropped"
        truncated = truncated or max(completion_lens) > room
    return "truncated" if truncated else "kept"


def describe_source(path: str) -> str:
    name = path.lower()
    if Path(path).expanduser().is_dir() or Path(path.rpartition(":")[0] or path).expanduser().is_dir():
        return "datasets save_to_disk folder"
    for suffixes, label in ((".jsonl.gz", "JSON Lines (gzip)"), ((".jsonl", ".ndjson"), "JSON Lines"),
                            ((".json", ".json.gz"), "JSON"), (".parquet", "Parquet")):
        if name.endswith(suffixes):
            return label
    return "hub dataset"


def record_format(example: Example) -> str:
    messages = isinstance(example.prompt, list)
    if example.kind == "pair":
        if example.prompt_source == "implicit":
            return "conversational, implicit prompt" if messages else "implicit prompt (dialogue text)"
        return "conversational" if messages else "standard"
    if example.kind == "unpaired":
        return "KTO (messages)" if messages else "KTO (text)"
    if example.kind == "group":
        return "group (messages)" if messages else "group (text)"
    return "SFT messages" if example.prompt_source == "messages" else "SFT prompt/completion"


def row_kind(row: dict) -> str:
    """The kind of data a raw row holds: "group" for a response group (:func:`~preftune.data.formats.is_group_row`),
    else :func:`~preftune.data.convert.detect_kind`'s."""
    return "group" if is_group_row(row) else detect_kind(row)


def classify(error: DataError) -> str:
    """Which record problem (doctor check) a :class:`DataError` from ``to_example`` is."""
    return {"identical": IDENTICAL, "empty": EMPTY, "prompt_split": PROMPT_SPLIT}.get(error.reason, BAD)


# ---------------------------------------------------------------------------- the one read


class _Doctor:
    """Streams the file once, keeping per-example lengths and hashed keys, not the examples."""

    def __init__(self, source: str, tokenizer, eval_prompts: dict[str, str] | None):
        self.source, self.tokenizer, self.eval_prompts = source, tokenizer, eval_prompts
        self.kind: str | None = None
        self.rows = 0
        self.problems = {name: Finding(name, "ok", "") for name in (*_RECORD_PROBLEMS, EXACT, NEAR, CONFLICT,
                                                                     MARKERS, LEAK)}
        self.tokenizer_error: str | None = None
        self.locations: list[Location] = []
        self.chars: dict[str, array] = {}
        self.tokens: dict[str, array] = {}
        self.record_formats: dict[str, int] = {}
        self.prompt_sources: dict[str, int] = {}
        self.labels = {True: 0, False: 0}
        self.exact_seen: dict[bytes, Location] = {}
        self.near_seen: dict[bytes, Location] = {}
        self.leaked_prompts: set[str] = set()
        self.prompts: set[bytes] = set()
        self.groups = GroupChecks()

    def read(self) -> None:
        pending: list[Example] = []
        for location, row in read_rows(self.source, on_bad_record=self._unreadable):
            self.rows += 1
            self.kind = self.kind or row_kind(row)
            try:
                pending.append(to_example(row, location, self.kind))
            except DataError as err:
                self._note(classify(err), str(err))
            if len(pending) == CHUNK:
                self._measure(pending)
                pending = []
        self._measure(pending)
        self.kind = self.kind or "pair"

    def _unreadable(self, err: DataError) -> None:
        self.rows += 1
        self._note(BAD, str(err))

    def _note(self, check: str, where: str) -> None:
        finding = self.problems[check]
        finding.count += 1
        if len(finding.locations) < MAX_LOCATIONS:
            finding.locations.append(where)

    def _measure(self, examples: list[Example]) -> None:
        """Tokenize a chunk (if we can), then look at each example that survived."""
        token_lens: dict[Location, list[int]] = {}
        if self.tokenizer is not None and self.tokenizer_error is None and examples:
            try:
                tokenized = tokenize_examples(self.tokenizer, examples, report=DataReport(self.source, self.kind),
                                              on_bad=lambda err: self._note(BAD, str(err)))
            except ValueError as err:  # e.g. messages but no chat template: fall back to characters
                self.tokenizer_error = str(err)
            else:
                token_lens = {t.location: [len(t.prompt_ids), *map(len, t.completions)] for t in tokenized}
                examples = [ex for ex in examples if ex.location in token_lens]
        for example in examples:
            self._look_at(example, token_lens.get(example.location))

    def _look_at(self, example: Example, token_lens: list[int] | None) -> None:
        names, parts = _parts(example)
        chars = [len(messages_text(part)) for part in parts]
        for name, n in zip(names, chars):
            self.chars.setdefault(_length_row(name), array("l")).append(n)
        if token_lens is not None:
            for name, n in zip(names, token_lens):
                self.tokens.setdefault(_length_row(name), array("l")).append(n)
        where = example.location
        self.locations.append(where)
        _count(self.record_formats, record_format(example))
        _count(self.prompt_sources, example.prompt_source)
        if example.kind == "unpaired":
            self.labels[example.label] += 1

        label = () if example.label is None else (str(example.label),)
        label += tuple(map(repr, example.scores or ()))
        exact = _digest(*map(messages_text, parts), *label)
        normalised = [normalize_text(messages_text(part)) for part in parts]
        near = _digest(*normalised, *label)
        self.prompts.add(_digest(messages_text(example.prompt)))
        if exact in self.exact_seen:
            self._note(EXACT, f"{where} (same as {_short(self.exact_seen[exact])})")
        else:
            self.exact_seen[exact] = where
            if near in self.near_seen:
                self._note(NEAR, f"{where} (like {_short(self.near_seen[near])})")
        opposite = _opposite_key(example, normalised)
        if opposite not in (None, near) and opposite in self.near_seen:
            self._note(CONFLICT, f"{where} (opposite of {_short(self.near_seen[opposite])})")
        self.near_seen.setdefault(near, where)
        if example.kind == "group":
            self.groups.add(example, normalised, chars, token_lens)

        for name, part in zip(names[1:], parts[1:]):
            text = messages_text(part)
            if HUMAN_MARKER in text or ASSISTANT_MARKER in text:
                self._note(MARKERS, f"{where} ({name})")
        if self.eval_prompts is not None:
            key = normalised[0]
            if key in self.eval_prompts:
                self.leaked_prompts.add(key)
                snippet = " ".join(messages_text(example.prompt).split())[:60]
                self._note(LEAK, f"{where} = {self.eval_prompts[key]}: {snippet!r}")

    # ------------------------------------------------------------------------ the report

    def report(self, max_length, max_prompt_length, eval_path) -> DoctorReport:
        valid = len(self.locations)
        noun = NOUNS[self.kind]
        findings = [self._size_finding(valid, noun)]
        findings += [self._record_finding(name) for name in _RECORD_PROBLEMS
                     if name != IDENTICAL or self.kind == "pair"]
        findings += self._duplicate_findings(noun)
        if self.kind == "unpaired":
            findings.append(_labels_finding(self.labels))
        exact = bool(self.tokens) and self.tokenizer_error is None
        lengths = self.tokens if exact else {name: array("l", ((n + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
                                                              for n in values)) for name, values in self.chars.items()}
        if self.kind == "pair":
            measured = self.tokens if exact else self.chars  # characters are finer than characters / 4
            findings.append(_bias_finding(measured.get("chosen", array("l")), measured.get("rejected", array("l")),
                                          unit="tokens" if exact else "characters"))
        if self.kind == "group":
            findings += self.groups.findings(exact)
        if max_length is not None or max_prompt_length is not None:
            per_example = (self.groups.lengths(exact) if self.kind == "group" else
                           [[values[i] for values in lengths.values()] for i in range(len(self.locations))])
            findings += self._truncation_findings(per_example, max_length, max_prompt_length, exact, noun)
        if eval_path is not None:
            leak = self.problems[LEAK]
            leak.severity = "error" if leak.count else "ok"
            leak.message = (f"{leak.count} {noun} use {len(self.leaked_prompts)} prompts that are also in "
                            f"{os.fspath(eval_path)} ({len(self.eval_prompts)} prompts): held-out numbers would be "
                            "inflated; split with 'preftune data split'" if leak.count else
                            f"no prompt shared with {os.fspath(eval_path)} ({len(self.eval_prompts)} prompts)")
            findings.append(leak)
        if self.tokenizer_error is not None:
            findings.append(Finding(TOKENIZER, "error", f"cannot tokenize: {self.tokenizer_error}; "
                                                        "lengths below are approximate"))
        unit = ("tokens (prompt with BOS, responses with EOS)" if exact else
                "approximate tokens (characters / 4; pass --tokenizer for exact counts)")
        return DoctorReport(source=self.source, file_format=describe_source(self.source), kind=self.kind,
                            rows=self.rows, valid=valid, record_formats=self.record_formats,
                            prompt_sources=self.prompt_sources, length_unit=unit,
                            lengths={name: LengthStats.of(values) for name, values in lengths.items()},
                            findings=findings)

    def _size_finding(self, valid: int, noun: str) -> Finding:
        if valid == 0:
            return Finding(SIZE, "error", f"no valid {noun} in {self.rows} rows", valid)
        message = f"{valid} valid {noun} of {self.rows} rows, {len(self.prompts)} distinct prompts"
        if valid < MIN_PAIRS:
            return Finding(SIZE, "warning", f"{message}: under {MIN_PAIRS}; preference tuning wants 1K-5K at "
                                            "least, or it overfits and its metrics are noise", valid)
        return Finding(SIZE, "ok", message, valid)

    def _record_finding(self, name: str) -> Finding:
        finding = self.problems[name]
        finding.message = {BAD: "malformed JSON, wrong types or missing fields",
                           PROMPT_SPLIT: "no 'prompt' field, and no shared turn to cut one at",
                           EMPTY: "a response that is empty or whitespace only",
                           IDENTICAL: "chosen and rejected the same"}[name]
        if finding.count:
            finding.severity = "error"
            finding.message += "; preftune train stops at the first (--skip-bad-records skips them)"
        return finding

    def _duplicate_findings(self, noun: str) -> list[Finding]:
        same = {"pair": "prompt, chosen and rejected", "unpaired": "prompt, completion and label",
                "sft": "prompt and completion", "group": "prompt, responses and scores"}[self.kind]
        checks = {EXACT: f"same {same} as an earlier record",
                  NEAR: "equal to an earlier record once lowercased, punctuation dropped, whitespace collapsed",
                  CONFLICT: "the opposite preference of an earlier record",
                  MARKERS: "a response holding a '\\n\\nHuman:' or '\\n\\nAssistant:' turn (it runs on past its reply)"}
        out = []
        for name, message in checks.items():
            finding = self.problems[name]
            if name == CONFLICT and self.kind in ("sft", "group") or name == MARKERS and not finding.count:
                continue
            finding.severity, finding.message = ("warning" if finding.count else "ok"), message
            out.append(finding)
        return out

    def _truncation_findings(self, per_example: list, max_length, max_prompt_length, exact: bool,
                             noun: str) -> list[Finding]:
        """``per_example[i]``: example i's lengths, prompt first, then each response."""
        outcomes: dict[str, list[str]] = {"kept": [], "truncated": [], "dropped": []}
        for where, lengths in zip(self.locations, per_example):
            outcome = truncation_outcome(lengths[0], list(lengths[1:]), max_length, max_prompt_length)
            outcomes[outcome].append(str(where))
        truncated, dropped = outcomes["truncated"], outcomes["dropped"]
        limits = ", ".join(f"{flag} {value}" for flag, value in (("--max-length", max_length),
                                                                  ("--max-prompt-length", max_prompt_length))
                           if value is not None)
        approx = "" if exact else " (approximate: no tokenizer)"
        share = f"{len(truncated) / max(1, len(self.locations)):.1%}"
        return [Finding(TRUNCATED, "warning" if truncated else "ok",
                        f"{noun} cut to fit {limits} ({share}){approx}", len(truncated), truncated[:MAX_LOCATIONS]),
                Finding(DROPPED, "error" if dropped and len(dropped) == len(self.locations) else
                        "warning" if dropped else "ok",
                        f"{noun} whose prompt leaves no room for a response under {limits}; training drops "
                        f"them{approx}", len(dropped), dropped[:MAX_LOCATIONS])]


def _bias_finding(chosen: array, rejected: array, unit: str) -> Finding:
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    ties = len(chosen) - longer - shorter
    if longer + shorter == 0:
        return Finding(BIAS, "ok", "no pairs differ in length", 0)
    share = longer / (longer + shorter)
    return length_bias_finding(BIAS, longer, shorter, f"chosen longer in {share:.1%} of pairs that differ in length "
                                                      f"({longer} longer, {shorter} shorter, {ties} equal, in {unit})")


def _labels_finding(labels: dict[bool, int]) -> Finding:
    message = f"{labels[True]} desirable, {labels[False]} undesirable"
    if not labels[True] or not labels[False]:
        return Finding(LABELS, "error", f"{message}: KTO needs both labels", min(labels.values()))
    return Finding(LABELS, "ok", message, min(labels.values()))


def _eval_prompts(eval_path) -> dict[str, str]:
    """Normalised prompt -> the first ``file:line`` holding it, over the good records of ``eval_path``."""
    prompts: dict[str, str] = {}
    kind = None
    for location, row in read_rows(eval_path, on_bad_record=lambda err: None):
        kind = kind or row_kind(row)
        try:
            prompts.setdefault(prompt_key(to_example(row, location, kind).prompt), str(location))
        except DataError:
            continue
    return prompts


def _parts(example: Example) -> tuple[tuple[str, ...], list]:
    if example.kind == "pair":
        return ("prompt", "chosen", "rejected"), [example.prompt, example.chosen, example.rejected]
    if example.kind == "group":
        return ("prompt", *(f"response {i + 1}" for i in range(len(example.responses)))), [example.prompt,
                                                                                          *example.responses]
    return ("prompt", "completion"), [example.prompt, example.completion]


def _length_row(name: str) -> str:
    """The length table's row of a part: every response of a group is one row, ``responses``."""
    return "responses" if name.startswith("response ") else name


def _opposite_key(example: Example, normalised: list[str]) -> bytes | None:
    if example.kind == "pair":
        return _digest(normalised[0], normalised[2], normalised[1])
    if example.kind == "unpaired":
        return _digest(*normalised, str(not example.label))
    return None


def _digest(*texts: str) -> bytes:
    return hashlib.blake2b("\x00".join(texts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _short(location: Location) -> str:
    return f"line {location.line}" if location.line is not None else f"row {location.row}"


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
