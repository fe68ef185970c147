"""Labels -> training data by majority vote: ``export_labels(db, out, to="pairs"|"kto"|"ranked")``.

Per task, the live labels that are not skips are its *votes*. A task is kept when it has at least
``min_votes`` votes, one answer has more votes than every other (the *majority*; two answers
sharing the most is a *split vote*), that answer is not "tie", and its share of the votes is at
least ``min_agreement``. Everything left out is counted by reason.

==========  =======================================================================================
pairs       ``{"prompt", "chosen", "rejected", "meta"}`` — what ``preftune train`` and ``data check``
            read. A rank task gives every pair of its responses that a majority ordered the same way
            (the InstructGPT recipe); those pairs are counted as *response pairs*.
kto         ``{"prompt", "completion", "label", "meta"}``: thumbs tasks by their majority; a pair task's
            chosen (true) then rejected (false); a rank task's consensus best (true) and worst (false)
ranked      ``{"prompt", "responses": [best ... worst], "ranks", "meta"}``: a candidates file again
            and a response-group file ``preftune train`` reads (kind "group"). Pair tasks as
            [chosen, rejected] with ranks [1, 2]; rank tasks in consensus order, each response's rank
            its mean rank over the annotators (1 = best; equal means are ties). Empty responses of a
            rank task are left out (training refuses them); a task left with fewer than 2 is dropped
==========  =======================================================================================

``meta`` holds the task id, the candidates line, the votes, the agreement, the annotators, their
reasons and the candidate's own ``meta``. Pairs whose two texts are identical or one is empty are
dropped (training refuses them).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from preftune.collect.candidates import Task
from preftune.collect.store import Label, LabelStore
from preftune.data.convert import check_output_path, write_rows

TARGETS = ("pairs", "kto", "ranked")


@dataclass
class ExportResult:
    """What :func:`export_labels` did. ``dropped`` counts tasks by reason, except keys starting
    with "response pairs:" (pairs of a rank task's responses) or "ranked:" (responses of a rank task)."""

    destination: str
    target: str
    tasks: int = 0
    tasks_kept: int = 0  # tasks that gave at least one row
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        line = (f"{self.tasks} tasks -> {self.written} {self.target} rows from {self.tasks_kept} tasks written "
                f"to {self.destination}")
        if self.dropped:
            line += "; dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return line

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def export_labels(db, out: str | os.PathLike, to: str = "pairs", min_votes: int = 1,
                  min_agreement: float = 0.0) -> ExportResult:
    """Write the majority-vote data of ``db`` (a path or a :class:`LabelStore`) to ``out``
    (``.jsonl``, ``.jsonl.gz`` or ``.parquet``, written whole or not at all; no row: not written, an
    existing file left as it was). ``out`` that cannot be written raises ``CannotWriteError`` /
    ``DiskFullError`` (``ValueError``, one line naming it)."""
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    if min_votes < 1:
        raise ValueError(f"--min-votes must be >= 1, got {min_votes}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
    store = db if isinstance(db, LabelStore) else LabelStore(db, readonly=True)
    try:
        check_output_path(out, store.path)
        result = ExportResult(destination=os.fspath(out), target=to)
        rows = majority_rows(store, to, min_votes, min_agreement, result)
        result.written = write_rows(out, rows, keep_empty=False)
    finally:
        if store is not db:
            store.close()
    return result


def majority_rows(store: LabelStore, to: str, min_votes: int, min_agreement: float,
                  result: ExportResult) -> list[dict]:
    """The rows of every task of ``store`` that is kept (see the module docstring), counted in ``result``."""
    tasks = store.tasks()
    by_task: dict[int, list[Label]] = defaultdict(list)
    for label in store.labels():
        by_task[label.task_id].append(label)
    result.tasks = len(tasks)
    rows: list[dict] = []
    for task_id, task in tasks.items():
        made = _task_rows(task_id, task, by_task.get(task_id, []), to, min_votes, min_agreement, result)
        if made:
            result.tasks_kept += 1
            rows.extend(made)
    return rows


def majority(votes: Sequence[Hashable]) -> tuple[Hashable | None, float]:
    """``(answer, share)`` of the answer with strictly the most votes; ``(None, share)`` on a split."""
    counts = Counter(votes).most_common()
    top, top_count = counts[0]
    if len(counts) > 1 and counts[1][1] == top_count:
        return None, top_count / len(votes)
    return top, top_count / len(votes)


# ----------------------------------------------------------------------------- per task


def _task_rows(task_id: int, task: Task, labels: list[Label], to: str, min_votes: int, min_agreement: float,
               result: ExportResult) -> list[dict]:
    if not labels:
        result.drop("unlabelled")
        return []
    votes = [label for label in labels if label.choice != "skip"]
    if not votes:
        result.drop("all skipped")
        return []
    if len(votes) < min_votes:
        result.drop(f"fewer than {min_votes} votes")
        return []
    meta = {"task_id": task_id, "line": task.line, "annotators": sorted(label.annotator for label in votes),
            "reasons": [{"annotator": label.annotator, "reason": label.reason} for label in votes if label.reason]}
    if task.meta:
        meta["candidate_meta"] = task.meta
    if task.mode == "thumbs":
        return _thumbs(task, votes, to, min_agreement, meta, result)
    if task.mode == "pair":
        return _pair(task, votes, to, min_agreement, meta, result)
    return _rank(task, votes, to, min_votes, min_agreement, meta, result)


def _decided(answer, share: float, min_agreement: float, result: ExportResult, prefix: str = "") -> bool:
    if answer is None:
        result.drop(f"{prefix}split vote")
    elif answer == "tie":
        result.drop(f"{prefix}majority tie")
    elif share < min_agreement:
        result.drop(f"{prefix}agreement under {min_agreement:g}")
    else:
        return True
    return False


def _thumbs(task: Task, votes: list[Label], to: str, min_agreement: float, meta: dict,
            result: ExportResult) -> list[dict]:
    if to != "kto":
        result.drop("thumbs tasks (export them with --to kto)")
        return []
    answer, share = majority([label.choice for label in votes])
    if not _decided(answer, share, min_agreement, result):
        return []
    completion = task.responses[0]
    if not _text(completion).strip():
        result.drop("unusable responses (empty or identical)")
        return []
    meta = {**meta, "votes": dict(Counter(label.choice for label in votes)), "agreement": round(share, 6)}
    if task.response_index is not None:
        meta["response_index"] = task.response_index
    return [{"prompt": task.prompt, "completion": completion, "label": answer == "up", "meta": meta}]


def _pair(task: Task, votes: list[Label], to: str, min_agreement: float, meta: dict,
          result: ExportResult) -> list[dict]:
    answers = ["tie" if label.choice == "tie" else label.winner for label in votes]
    answer, share = majority(answers)
    if not _decided(answer, share, min_agreement, result):
        return []
    chosen, rejected = task.responses[answer], task.responses[1 - answer]
    if not _usable(chosen, rejected):
        result.drop("unusable responses (empty or identical)")
        return []
    counts = Counter(answers)
    meta = {**meta, "votes": {"chosen": counts[answer], "rejected": counts[1 - answer], "tie": counts["tie"]},
            "agreement": round(share, 6), "chosen_index": answer}
    return _rows(task.prompt, chosen, rejected, to, meta)


def _rank(task: Task, votes: list[Label], to: str, min_votes: int, min_agreement: float, meta: dict,
          result: ExportResult) -> list[dict]:
    places = [{response: rank for rank, response in enumerate(label.ranking)} for label in votes]
    n = len(task.responses)
    if to == "pairs":
        rows = []
        for i, j in combinations(range(n), 2):
            answers = [i if place[i] < place[j] else j for place in places]
            answer, share = majority(answers)
            if not _decided(answer, share, min_agreement, result, prefix="response pairs: "):
                continue
            loser = j if answer == i else i
            if not _usable(task.responses[answer], task.responses[loser]):
                result.drop("response pairs: unusable responses (empty or identical)")
                continue
            pair_meta = {**meta, "votes": {"chosen": answers.count(answer), "rejected": answers.count(loser)},
                         "agreement": round(share, 6), "chosen_index": answer, "rejected_index": loser}
            rows.append({"prompt": task.prompt, "chosen": task.responses[answer],
                         "rejected": task.responses[loser], "meta": pair_meta})
        return rows
    mean_rank = [statistics.fmean(place[r] for place in places) for r in range(n)]
    order = sorted(range(n), key=lambda r: (mean_rank[r], r))
    pair_shares = [majority([i if place[i] < place[j] else j for place in places])[1]
                   for i, j in combinations(range(n), 2)]
    agreement = statistics.fmean(pair_shares)
    if agreement < min_agreement:
        result.drop(f"agreement under {min_agreement:g}")
        return []
    meta = {**meta, "mean_rank": [round(mean_rank[r], 6) for r in order], "order": order,
            "agreement": round(agreement, 6)}
    if to == "ranked":
        return _ranked(task, order, mean_rank, meta, result)
    best, worst = order[0], order[-1]
    if mean_rank[order[1]] == mean_rank[best] or mean_rank[order[-2]] == mean_rank[worst]:
        result.drop("majority tie")
        return []
    if not _usable(task.responses[best], task.responses[worst]):
        result.drop("unusable responses (empty or identical)")
        return []
    return _rows(task.prompt, task.responses[best], task.responses[worst], "kto", meta)


def _rows(prompt, chosen, rejected, to: str, meta: dict) -> list[dict]:
    if to == "pairs":
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}]
    if to == "kto":  # chosen then rejected: labels alternate in file order
        return [{"prompt": prompt, "completion": chosen, "label": True, "meta": meta},
                {"prompt": prompt, "completion": rejected, "label": False, "meta": meta}]
    return [{"prompt": prompt, "responses": [chosen, rejected], "ranks": [1, 2], "meta": meta}]


def _ranked(task: Task, order: list[int], mean_rank: list[float], meta: dict, result: ExportResult) -> list[dict]:
    """A rank task's ranked row: its non-empty responses in consensus ``order``, ``ranks`` their 1-based
    mean ranks (a response group; ``meta`` keeps every response's mean rank and the full order)."""
    kept = [r for r in order if _text(task.responses[r]).strip()]
    if len(kept) < len(order):
        result.drop("ranked: empty responses left out", len(order) - len(kept))
    if len(kept) < 2:
        result.drop("unusable responses (empty or identical)")
        return []
    return [{"prompt": task.prompt, "responses": [task.responses[r] for r in kept],
             "ranks": [round(mean_rank[r] + 1, 6) for r in kept], "meta": meta}]


def _text(value) -> str:
    return value if isinstance(value, str) else "".join(m.get("content", "") for m in value)


def _usable(chosen, rejected) -> bool:
    return bool(_text(chosen).strip()) and bool(_text(rejected).strip()) and chosen != rejected
