"""The stage runner both recipes share (the offline quickstart and ``--real``), with their run-folder checks,
``--resume`` of finished stages, and the pieces their summaries and reports have in common.

* :class:`StageRunner` runs named stages in order: a ``[i/n] name: title  (elapsed ...)`` line before each,
  ``  name: done in ...`` after it, the seconds of each in stage order; a stage an earlier run finished
  (``kept``) is skipped with a line saying so, its earlier seconds counted in the total.
* :func:`check_run_folder` refuses a file or a folder holding entries the recipe does not write;
  :func:`clear_entries` removes a stage's own entries before it runs again.
* :func:`resumed_metrics`: what ``--resume`` keeps of an earlier run's ``metrics.json`` (same settings, the
  leading stages whose entries are all still there).
* :func:`write_metrics` (atomic), :func:`example_samples`, :func:`markdown_table`, :func:`aligned_rows`,
  :func:`sample_lines`, :func:`rate_text`, :func:`verdict_line`: the summary and report pieces.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from preftune.common.files import json_safe, write_atomic
from preftune.common.text import duration

# ------------------------------------------------------------------------------------------------ running stages


class StageRunner:
    """Runs a recipe's stages by name, in the order of ``names``, timing each.

    ``echo`` prints the stage lines. ``kept`` maps the stages an earlier run finished (``--resume``) to their
    measured seconds: :meth:`run` skips them. ``before(name)`` runs before a stage (clearing its entries),
    ``after(name)`` after it finishes (writing what was measured so far).
    """

    def __init__(self, names: Iterable[str], echo: Callable[[str], None] = print,
                 kept: dict[str, float] | None = None, before: Callable[[str], None] | None = None,
                 after: Callable[[str], None] | None = None):
        self.names = list(names)
        self.echo, self.before, self.after = echo, before, after
        self.kept = dict(kept or {})
        self.started = time.perf_counter()
        self._seconds: dict[str, float] = dict(self.kept)
        self._current: tuple[str, float] | None = None  # the running stage and its start

    def run(self, name: str, title: str | Callable[[], str], body: Callable[[], None]) -> None:
        """Run ``body`` as stage ``name`` (``title``: its line, or a function giving it), unless it is kept."""
        number = f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"
        if name in self.kept:
            self.echo(f"\n{number}: kept from the earlier run ({duration(self.kept[name])}; --resume)")
            return
        if self.before:
            self.before(name)
        title = title() if callable(title) else title
        self.echo(f"\n{number}: {title}  (elapsed {duration(self.elapsed())})")
        self._current = (name, time.perf_counter())
        try:
            body()
            self._seconds[name] = round(time.perf_counter() - self._current[1], 1)
        finally:
            self._current = None
        self.echo(f"  {name}: done in {duration(self._seconds[name])}")
        if self.after:
            self.after(name)

    def elapsed(self) -> float:
        """Seconds since this runner started (this run only)."""
        return time.perf_counter() - self.started

    def total_seconds(self) -> float:
        """The recipe's run time: this run's elapsed seconds plus the kept stages' earlier ones."""
        return round(self.elapsed() + sum(self.kept.values()), 1)

    def stage_seconds(self) -> dict[str, float]:
        """Each finished (or kept) stage's seconds in stage order; the running stage's so far, if one runs."""
        seconds = dict(self._seconds)
        if self._current:
            seconds[self._current[0]] = round(time.perf_counter() - self._current[1], 1)
        return {name: seconds[name] for name in self.names if name in seconds}


# ------------------------------------------------------------------------------------------------ the run folder


def check_run_folder(out: Path, entries: Iterable[str], writer: str) -> Path:
    """``out``; ValueError when it is a file or a folder holding top-level entries not in ``entries`` (what
    the recipe writes; ``writer`` names the recipe in the message, e.g. ``"the real recipe"``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file")
    if out.exists():
        known = set(entries)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in known)
        if foreign:
            raise ValueError(f"--output-dir {out} holds files {writer} did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")
    return out


def clear_entries(out: Path, entries: Iterable[str]) -> None:
    """Remove each of ``entries`` (paths relative to ``out``, files or folders) that exists."""
    for name in entries:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_metrics(out: Path, metrics: dict) -> None:
    """``out/metrics.json``, written atomically (a run stopped mid-write keeps the earlier file); non-finite
    floats become null."""
    write_atomic(out / "metrics.json", json.dumps(json_safe(metrics), indent=1))


def resumed_metrics(out: Path, config: dict, stage_entries: dict[str, tuple[str, ...]], resumable: list[str],
                    free: Iterable[str] = (), transient: Iterable[str] = (), recipe: str = "recipe") -> dict:
    """What ``--resume`` keeps from ``out``'s earlier run: its metrics.json with ``resumed`` naming the
    leading stages of ``resumable`` it finished (measured there, every entry of ``stage_entries[name]`` but the
    ``transient`` ones still there) and ``stage_seconds`` holding theirs only; {} when there is no earlier run
    or it finished none of them.

    ``config``: this run's settings (JSON-able); the earlier run's must equal them in every key but ``free``
    ones, else ValueError naming each difference. ``recipe`` names the recipe in the messages.
    """
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        done, before = earlier["stage_seconds"], earlier["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {path} is not a {recipe}'s metrics.json ({err!r}); "
                         "run without --resume to start over") from None
    now = json.loads(json.dumps(config))  # as the earlier run wrote it (lists, not tuples)
    free = set(free)
    differ = sorted(k for k in set(now) | set(before) if k not in free and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"--resume: the earlier run in {out} had other settings ({', '.join(differ)}: "
                         f"{', '.join(f'{before.get(k)!r} now {now.get(k)!r}' for k in differ)}); "
                         "run without --resume to start over")
    transient, stages = set(transient), []
    for name in resumable:
        entries = [entry for entry in stage_entries[name] if entry not in transient]
        if name not in done or not all((out / entry).exists() for entry in entries):
            break
        stages.append(name)
    return {**earlier, "stage_seconds": {name: done[name] for name in stages}, "resumed": stages} if stages else {}


# ------------------------------------------------------------------------------------------------ report pieces


def example_samples(samples: list[dict], n: int) -> list[dict]:
    """The first sample of each of the first ``n`` prompts (deterministic, not cherry-picked)."""
    firsts: dict[str, dict] = {}
    for row in samples:
        firsts.setdefault(row["prompt"], row)
    return list(firsts.values())[:n]


def sample_lines(rows: list[dict], sides: list[tuple[str, str]], markdown: bool) -> list[str]:
    """Sample generations, each row's prompt (its first line) then one line per ``(label, key)`` of ``sides``
    with ``row[key + "_score"]`` and ``row[key]``: markdown bullets for a report, indented lines for the
    terminal."""
    lines: list[str] = []
    for row in rows:
        prompt = row["prompt"].splitlines()[0]
        if markdown:
            lines += [f"**{prompt}**", ""]
            lines += [f"* {label} ({row[key + '_score']:+.2f}): {row[key]}" for label, key in sides]
            lines.append("")
        else:
            lines.append(f"  {prompt}")
            lines += [f"    {label} [{row[key + '_score']:+.2f}] {row[key]}" for label, key in sides]
    return lines


def markdown_table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    """A markdown table's lines; ``|`` and line breaks inside a cell are escaped."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def aligned_rows(rows: Iterable[tuple[str, str, str]], name_width: int, value_width: int,
                 indent: str = "") -> list[str]:
    """``(name, value, last)`` rows for the terminal: the name left-aligned in ``name_width`` characters, the
    value right-aligned in ``value_width``, two spaces, the last column."""
    return [f"{indent}{name:<{name_width}}{value:>{value_width}}  {last}" for name, value, last in rows]


def interval_text(value: float, low: float, high: float, n: int | None = None) -> str:
    """``"0.690 [0.630, 0.740]"``, with ``" (n=240)"`` when ``n`` is given."""
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" + ("" if n is None else f" (n={n})")


def rate_text(rate: dict | None) -> str:
    """A win rate (``{"rate", "low", "high", "n"}``) as :func:`interval_text` with n; ``"n/a"`` when missing."""
    if not rate:
        return "n/a"
    return interval_text(rate["rate"], rate["low"], rate["high"], rate["n"])


def verdict_line(passed: bool, result: str, seconds: str, report: Path) -> str:
    """``"PASS: <result>; <seconds>; report: <path>"`` (FAIL when not ``passed``)."""
    return f"{'PASS' if passed else 'FAIL'}: {result}; {seconds}; report: {report}"
