"""How the labelling went: labels and time per annotator, agreement, position and length bias.

Agreement is measured on *units* with one nominal value per annotator:

* pair task: the better response (canonical index) or ``tie``; skips are left out;
* thumbs task: ``up`` / ``down``;
* rank task: every pair of its responses ``(i, j)`` is a unit, valued by which one the annotator
  ranked higher — so two rankings agree as much as their pairwise orders do.

Numbers: **raw agreement** (the share of annotator pairs on a unit giving the same value),
**Cohen's kappa** per pair of annotators on the units both labelled, and **Krippendorff's alpha**
(nominal) over everyone. Position bias: the share of decisive pair labels whose winner was shown
on the left (0.5 when there is none), with an exact binomial p-value; length bias: the share of
decisive pair labels (with responses of different length) choosing the longer one. For rank labels
the same two questions are asked of the top choice (shown first? longer than the bottom one?).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from itertools import combinations

from preftune.collect.candidates import Task
from preftune.collect.store import Label, LabelStore
from preftune.common.text import number

# ----------------------------------------------------------------------------- agreement measures


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two annotators' values on the same items: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the share of items where they agree, ``p_e`` the agreement expected by chance from
    each annotator's own value frequencies, ``sum_c (a_c / N) * (b_c / N)`` (Cohen 1960). None when
    undefined (no items, or both always give one and the same value: ``p_e = 1``).
    """
    if len(first) != len(second):
        raise ValueError(f"cohen_kappa needs two equally long lists, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal values; ``units[u]`` holds the values the annotators gave
    unit u (any number of them; missing labels are simply absent).

    Coincidence matrix: each unit with ``m_u >= 2`` values adds ``1 / (m_u - 1)`` to ``o[c][k]``
    for every ordered pair of values ``(c, k)`` from two different annotators. With
    ``n_c = sum_k o[c][k]`` and ``n = sum_c n_c``::

        alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o[c][k] / sum_{c != k} n_c * n_k

    (Krippendorff 2011, "Computing Krippendorff's alpha-reliability", nominal metric). Units with a
    single value are not pairable and are ignored. None when undefined (fewer than two pairable
    values, or only one value used anywhere: ``D_e = 0``).
    """
    coincidences: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidences[(c, k)] += 1.0 / (m - 1)
    totals: dict[Hashable, float] = defaultdict(float)
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    if n < 2:
        return None
    disagreement_observed = sum(w for (c, k), w in coincidences.items() if c != k)
    disagreement_expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if disagreement_expected == 0:
        return None
    return 1.0 - (n - 1) * disagreement_observed / disagreement_expected


def raw_agreement(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Share of agreeing pairs among all pairs of values given to the same unit (None: no pairs)."""
    agree = pairs = 0
    for values in units:
        for a, b in combinations(values, 2):
            pairs += 1
            agree += a == b
    return agree / pairs if pairs else None


def binomial_p_value(successes: int, trials: int, p: float = 0.5) -> float | None:
    """Exact two-sided binomial test: the probability under ``p`` of an outcome no more likely than
    ``successes`` of ``trials`` (None when ``trials == 0``)."""
    if trials == 0:
        return None
    probabilities = [math.comb(trials, i) * p ** i * (1 - p) ** (trials - i) for i in range(trials + 1)]
    observed = probabilities[successes]
    return min(1.0, sum(q for q in probabilities if q <= observed * (1 + 1e-9)))


# ----------------------------------------------------------------------------- from the store


def text_length(value) -> int:
    """Characters of a response: its text, or the content of its messages."""
    return len(value) if isinstance(value, str) else sum(len(m.get("content", "")) for m in value)


def agreement_units(labels: Sequence[Label]) -> dict[str, dict[tuple, dict[str, Hashable]]]:
    """``{mode: {unit: {annotator: value}}}`` (see the module docstring for units and values)."""
    units: dict[str, dict[tuple, dict[str, Hashable]]] = defaultdict(lambda: defaultdict(dict))
    for label in labels:
        if label.choice == "skip":
            continue
        if label.mode == "pair":
            units["pair"][(label.task_id,)][label.annotator] = "tie" if label.choice == "tie" else label.winner
        elif label.mode == "thumbs":
            units["thumbs"][(label.task_id,)][label.annotator] = label.choice
        elif label.mode == "rank" and label.ranking:
            place = {response: rank for rank, response in enumerate(label.ranking)}
            for i, j in combinations(sorted(place), 2):
                units["rank"][(label.task_id, i, j)][label.annotator] = i if place[i] < place[j] else j
    return {mode: dict(by_unit) for mode, by_unit in units.items()}


def agreement_report(units: dict[tuple, dict[str, Hashable]]) -> dict:
    """Raw agreement, Krippendorff's alpha and Cohen's kappa per annotator pair for one mode."""
    value_lists = [list(by_annotator.values()) for by_annotator in units.values()]
    annotators = sorted({a for by_annotator in units.values() for a in by_annotator})
    pairwise = []
    for a, b in combinations(annotators, 2):
        shared = [(v[a], v[b]) for v in units.values() if a in v and b in v]
        if shared:
            first, second = zip(*shared)
            pairwise.append({"annotators": [a, b], "shared_units": len(shared),
                             "raw": _round(sum(x == y for x, y in shared) / len(shared)),
                             "kappa": _round(cohen_kappa(first, second))})
    return {"units": len(units), "units_with_2_or_more": sum(len(v) >= 2 for v in value_lists),
            "raw": _round(raw_agreement(value_lists)), "krippendorff_alpha": _round(krippendorff_alpha_nominal(value_lists)),
            "cohen_kappa": pairwise[0]["kappa"] if len(annotators) == 2 and pairwise else None,
            "pairwise": pairwise}


def annotator_report(labels: Sequence[Label], tasks: dict[int, Task]) -> dict:
    """Counts, time per label, position bias and length bias of one annotator's (or everyone's) labels."""
    seconds = [label.seconds for label in labels]
    left = decisive = longer = different_length = first_top = ranked = 0
    expected_first_top = 0.0
    for label in labels:
        task = tasks[label.task_id]
        lengths = [text_length(r) for r in task.responses]
        if label.mode == "pair" and label.choice == "prefer":
            decisive += 1
            left += label.winner == label.display_order[0]
            loser = 1 - label.winner
            if lengths[label.winner] != lengths[loser]:
                different_length += 1
                longer += lengths[label.winner] > lengths[loser]
        elif label.mode == "rank" and label.choice == "rank" and label.ranking:
            ranked += 1
            first_top += label.ranking[0] == label.display_order[0]
            expected_first_top += 1 / len(label.ranking)
            top, bottom = label.ranking[0], label.ranking[-1]
            if lengths[top] != lengths[bottom]:
                different_length += 1
                longer += lengths[top] > lengths[bottom]
    report = {
        "labels": len(labels),
        "choices": dict(sorted(Counter(f"{label.mode}:{label.choice}" for label in labels).items())),
        "seconds_median": _round(statistics.median(seconds)) if seconds else None,
        "seconds_mean": _round(statistics.fmean(seconds)) if seconds else None,
        "position_bias": {"decisive": decisive, "left_chosen": left,
                          "left_share": _round(left / decisive) if decisive else None,
                          "p_value": _round(binomial_p_value(left, decisive))},
        "length_bias": {"decisive": different_length, "longer_chosen": longer,
                        "longer_share": _round(longer / different_length) if different_length else None,
                        "p_value": _round(binomial_p_value(longer, different_length))},
    }
    if ranked:
        report["rank_position_bias"] = {"rankings": ranked, "top_shown_first": first_top,
                                        "expected": _round(expected_first_top)}
    return report


def label_stats(db) -> dict:
    """Everything ``preftune label stats`` prints, as one JSON-ready dict (``db``: a path or a store)."""
    store = db if isinstance(db, LabelStore) else LabelStore(db, readonly=True)
    tasks = store.tasks()
    labels = store.labels()
    withdrawn = len(store.labels(include_undone=True)) - len(labels)
    by_annotator: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        by_annotator[label.annotator].append(label)
    per_task = Counter(label.task_id for label in labels)
    if store is not db:
        store.close()
    return {
        "db": str(store.path),
        "candidates": store.info.get("candidates"),
        "tasks": len(tasks),
        "tasks_by_mode": dict(sorted(Counter(t.mode for t in tasks.values()).items())),
        "labels": len(labels),
        "undone": withdrawn,
        "tasks_by_label_count": {str(k): v for k, v in sorted(Counter(per_task[t] for t in tasks).items())},
        "annotators": {name: annotator_report(rows, tasks) for name, rows in sorted(by_annotator.items())},
        "all": annotator_report(labels, tasks),
        "agreement": {mode: agreement_report(units) for mode, units in sorted(agreement_units(labels).items())},
    }


def format_stats(stats: dict) -> str:
    """The human-readable table of :func:`label_stats`."""
    lines = [f"{stats['db']}: {stats['labels']} labels on {stats['tasks']} tasks "
             f"({', '.join(f'{n} {m}' for m, n in stats['tasks_by_mode'].items())}); {stats['undone']} undone",
             "labels per task: " + ", ".join(f"{k} labels: {v} tasks" for k, v in stats["tasks_by_label_count"].items()),
             "", f"  {'annotator':16}{'labels':>7}{'s/label':>9}{'ties':>6}{'skips':>6}   "
                 f"{'left chosen':18}{'longer chosen':18}"]
    for name, row in [*stats["annotators"].items(), ("(all)", stats["all"])]:
        ties = sum(n for c, n in row["choices"].items() if c.endswith(":tie"))
        skips = sum(n for c, n in row["choices"].items() if c.endswith(":skip"))
        lines.append(f"  {name:16}{row['labels']:>7}{number(row['seconds_median'], '.1f', '-'):>9}{ties:>6}{skips:>6}   "
                     f"{_share(row['position_bias'], 'left_share'):18}{_share(row['length_bias'], 'longer_share'):18}")
    for mode, agreement in stats["agreement"].items():
        lines += ["", f"agreement ({mode}; {agreement['units_with_2_or_more']} of {agreement['units']} units with "
                      f"2+ labels): raw {number(agreement['raw'], '.3f', '-')}, Krippendorff's alpha "
                      f"{number(agreement['krippendorff_alpha'], '.3f', '-')}"
                      + (f", Cohen's kappa {number(agreement['cohen_kappa'], '.3f', '-')}" if agreement["cohen_kappa"] is not None
                         else "")]
        for pair in agreement["pairwise"]:
            lines.append(f"  {' vs '.join(pair['annotators'])}: {pair['shared_units']} shared, raw {number(pair['raw'], '.3f', '-')}, "
                         f"kappa {number(pair['kappa'], '.3f', '-')}")
    return "\n".join(lines)


def _share(bias: dict, key: str) -> str:
    if bias[key] is None:
        return "-"
    flag = " *" if bias["p_value"] is not None and bias["p_value"] < 0.05 else ""
    return f"{bias[key]:.2f} (p={bias['p_value']:.2g}){flag}"


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)
