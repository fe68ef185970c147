"""The labelling database: one SQLite file in WAL mode holding the tasks, who was shown what, and
every label.

Tables::

    info(key, value)            candidates path and SHA-256, mode, schema version
    tasks(id, line, mode, prompt, responses, response_index, meta)     JSON texts; never changed
    assignments(task_id, annotator, display_order, served_at)          one row per task shown
    labels(id, task_id, annotator, mode, display_order, choice, winner, ranking, reason,
           served_at, labelled_at, undone_at)

A label is a row of ``labels``; *undo* sets its ``undone_at`` (nothing is deleted, so the history
stays auditable) and the task is shown to that annotator again. At most one live label per
(task, annotator) (a partial unique index). ``display_order`` lists canonical response indices
in the order the page showed them (left to right, or top to bottom); ``winner`` and ``ranking``
are canonical indices, so agreement never depends on where a response was shown.

Durability: every write is one ``BEGIN IMMEDIATE`` transaction committed with
``synchronous=FULL`` before the call returns, so a label acknowledged to the page survives a
``kill -9`` of the server (and a power cut). One server per database: :func:`acquire_server_lock`
takes an exclusive ``flock`` on ``DB.lock``, which the OS releases when the process dies.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from preftune.collect.candidates import Task

SCHEMA_VERSION = "1"
LEASE_SECONDS = 30 * 60  # a task shown but not labelled holds its overlap slot this long
MAX_SQLITE_INT = 2**63 - 1  # SQLite integers are signed 64-bit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, line INTEGER NOT NULL, mode TEXT NOT NULL, prompt TEXT NOT NULL,
    responses TEXT NOT NULL, response_index INTEGER, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task_id INTEGER NOT NULL REFERENCES tasks(id), annotator TEXT NOT NULL,
    display_order TEXT NOT NULL, served_at REAL NOT NULL, PRIMARY KEY (task_id, annotator));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id INTEGER NOT NULL REFERENCES tasks(id),
    annotator TEXT NOT NULL, mode TEXT NOT NULL, display_order TEXT NOT NULL, choice TEXT NOT NULL,
    winner INTEGER, ranking TEXT, reason TEXT NOT NULL DEFAULT '', served_at REAL NOT NULL,
    labelled_at REAL NOT NULL, undone_at REAL);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_label ON labels (task_id, annotator) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, undone_at);
"""

# What the page may send, per mode (the server maps sides to canonical indices).
CHOICES = {"pair": ("left", "right", "tie", "skip"), "rank": ("rank", "skip"), "thumbs": ("up", "down", "skip")}


class StoreError(ValueError):
    """A request the store refuses (not your task, already labelled, bad choice); ``status`` is the
    HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Shown:
    """A task as served to one annotator: the task, its id, and the order its responses are shown."""

    task_id: int
    task: Task
    display_order: list[int]  # canonical response indices, left to right / top to bottom


@dataclass(frozen=True)
class Label:
    """One live label with its task, for stats and export."""

    label_id: int
    task_id: int
    annotator: str
    mode: str
    display_order: list[int]
    choice: str  # pair: prefer | tie | skip; rank: rank | skip; thumbs: up | down | skip
    winner: int | None  # pair "prefer": canonical index of the better response
    ranking: list[int] | None  # rank: canonical indices, best first
    reason: str
    seconds: float  # from the task being shown to the label being saved
    labelled_at: float


class LabelStore:
    """The SQLite store. Thread-safe: one connection behind a lock (the app's requests run in a
    thread pool). ``readonly=True`` opens an existing database for ``stats`` / ``export`` while a
    server may still be writing it."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self._lock = threading.Lock()
        refuse_folder(self.path)
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such labels database")
        try:
            self._conn = self._connect(readonly)
        except (OSError, sqlite3.Error) as err:
            raise _open_error(self.path, err, readonly) from None
        try:
            self.info = dict(self._conn.execute("SELECT key, value FROM info").fetchall())
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a preftune labels database ({err})") from None
        if readonly and not self.info:
            raise ValueError(f"{self.path}: not a preftune labels database (no info table rows)")

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        """The connection, in WAL mode with full sync and the schema made (read-only: as it is)."""
        if readonly:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            if not readonly:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise ValueError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the database on a "
                                     "local disk")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ setting up

    def load_tasks(self, tasks: Sequence[Task], candidates: str | os.PathLike, sha256: str, mode: str) -> None:
        """Fill a new database with ``tasks``, or check that an existing one was made from the same
        candidates file (by SHA-256) and mode; ``ValueError`` if not, or if SQLite cannot write it."""
        try:
            self._load_tasks(tasks, candidates, sha256, mode)
        except sqlite3.Error as err:
            raise ValueError(f"{self.path}: cannot write the labels database ({err})") from None

    def _load_tasks(self, tasks: Sequence[Task], candidates: str | os.PathLike, sha256: str, mode: str) -> None:
        with self._lock:
            self._begin()
            try:
                info = dict(self._conn.execute("SELECT key, value FROM info").fetchall())
                if info:
                    if info.get("candidates_sha256") != sha256 or info.get("mode") != mode:
                        raise ValueError(
                            f"{self.path} holds labels for {info.get('candidates')} (sha256 "
                            f"{info.get('candidates_sha256', '?')[:12]}, mode {info.get('mode')}); "
                            f"{os.fspath(candidates)} (sha256 {sha256[:12]}, mode {mode}) is a different file or "
                            "mode: use another --db")
                else:
                    self._conn.executemany(
                        "INSERT INTO tasks (id, line, mode, prompt, responses, response_index, meta) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(i, t.line, t.mode, _dump(t.prompt), _dump(t.responses), t.response_index, _dump(t.meta))
                         for i, t in enumerate(tasks)])
                    info = {"schema": SCHEMA_VERSION, "candidates": os.fspath(Path(candidates).resolve()),
                            "candidates_sha256": sha256, "mode": mode, "created": f"{time.time():.3f}"}
                    self._conn.executemany("INSERT INTO info (key, value) VALUES (?, ?)", info.items())
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.info = info

    # ------------------------------------------------------------------ the labelling loop

    def next_task(self, annotator: str, overlap: int, rng: random.Random | None = None,
                  now: float | None = None) -> Shown | None:
        """The task to show ``annotator`` now, or None when nothing is left for them.

        A task shown to them and not yet labelled comes first (the most recently shown: after an
        undo, the undone one), in the order it was shown before. Otherwise the first task they
        have not labelled whose labels plus live assignments of others are fewer than ``overlap``;
        its responses get a fresh random order, recorded in ``assignments``.
        """
        rng = rng or random.Random()
        now = time.time() if now is None else now
        with self._lock:
            self._begin()
            try:
                shown = self._pending(annotator, overlap, now) or self._assign(annotator, overlap, rng, now)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return shown

    def submit(self, annotator: str, task_id: int, display_order: Sequence[int], choice: str,
               ranking: Sequence[int] | None = None, reason: str = "", now: float | None = None) -> int:
        """Save one label and commit it; returns its id.

        ``display_order`` is what the page believes it showed (it must match the recorded one);
        ``choice`` is one of :data:`CHOICES` for the task's mode; for ``rank``, ``ranking`` lists
        display positions (0-based) best first. Raises :class:`StoreError` for a task not shown to
        ``annotator``, one already labelled by them, or a bad choice.
        """
        now = time.time() if now is None else now
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id <= MAX_SQLITE_INT:
            raise StoreError(f"task_id must be an integer from 0 to {MAX_SQLITE_INT}, got {task_id!r:.40}", status=422)
        with self._lock:
            self._begin()
            try:
                row = self._conn.execute(
                    "SELECT a.display_order, a.served_at, t.mode FROM assignments a JOIN tasks t ON t.id = a.task_id "
                    "WHERE a.task_id = ? AND a.annotator = ?", (task_id, annotator)).fetchone()
                if row is None:
                    raise StoreError(f"task {task_id} was not shown to {annotator!r}", status=409)
                order, served_at, mode = json.loads(row[0]), row[1], row[2]
                if list(display_order) != order:
                    raise StoreError(f"task {task_id}: the page's response order {list(display_order)} is not the "
                                     f"one recorded for {annotator!r}; reload the page", status=409)
                if self._live_label(task_id, annotator) is not None:
                    raise StoreError(f"task {task_id} is already labelled by {annotator!r}", status=409)
                stored_choice, winner, canonical_ranking = _canonical(mode, choice, ranking, order)
                cursor = self._conn.execute(
                    "INSERT INTO labels (task_id, annotator, mode, display_order, choice, winner, ranking, reason, "
                    "served_at, labelled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (task_id, annotator, mode, _dump(order), stored_choice, winner,
                     None if canonical_ranking is None else _dump(canonical_ranking), reason, served_at, now))
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return cursor.lastrowid

    def undo(self, annotator: str, now: float | None = None) -> int | None:
        """Withdraw ``annotator``'s latest live label; returns its task id (shown to them next), or
        None when they have nothing to undo."""
        now = time.time() if now is None else now
        with self._lock:
            self._begin()
            try:
                row = self._conn.execute(
                    "SELECT id, task_id FROM labels WHERE annotator = ? AND undone_at IS NULL "
                    "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
                if row is not None:
                    self._conn.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now, row[0]))
                    self._conn.execute("UPDATE assignments SET served_at = ? WHERE task_id = ? AND annotator = ?",
                                       (now, row[1], annotator))
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return None if row is None else row[1]

    def progress(self, annotator: str, overlap: int) -> dict:
        """Counts for the page: this annotator's labels, what is left for them, and the whole job."""
        with self._lock:
            q = self._conn.execute
            total = q("SELECT COUNT(*) FROM tasks").fetchone()[0]
            mine = q("SELECT COUNT(*) FROM labels WHERE annotator = ? AND undone_at IS NULL", (annotator,)).fetchone()[0]
            left = q("SELECT COUNT(*) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.task_id = t.id "
                     "AND l.annotator = ? AND l.undone_at IS NULL) AND (SELECT COUNT(*) FROM labels l WHERE "
                     "l.task_id = t.id AND l.undone_at IS NULL) < ?", (annotator, overlap)).fetchone()[0]
            complete = q("SELECT COUNT(*) FROM tasks t WHERE (SELECT COUNT(*) FROM labels l WHERE l.task_id = t.id "
                         "AND l.undone_at IS NULL) >= ?", (overlap,)).fetchone()[0]
            labels = q("SELECT COUNT(*) FROM labels WHERE undone_at IS NULL").fetchone()[0]
        return {"labelled_by_you": mine, "left_for_you": left, "tasks": total, "tasks_complete": complete,
                "labels": labels, "overlap": overlap}

    # ------------------------------------------------------------------ reading

    def tasks(self) -> dict[int, Task]:
        with self._lock:
            rows = self._conn.execute("SELECT id, line, mode, prompt, responses, response_index, meta FROM tasks "
                                      "ORDER BY id").fetchall()
        return {r[0]: Task(line=r[1], mode=r[2], prompt=json.loads(r[3]), responses=json.loads(r[4]),
                           response_index=r[5], meta=json.loads(r[6])) for r in rows}

    def labels(self, include_undone: bool = False) -> list[Label]:
        """Live labels (with ``include_undone``, withdrawn ones too), oldest first."""
        where = "" if include_undone else "WHERE undone_at IS NULL"
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, task_id, annotator, mode, display_order, choice, winner, ranking, reason, served_at, "
                f"labelled_at FROM labels {where} ORDER BY id").fetchall()
        return [Label(label_id=r[0], task_id=r[1], annotator=r[2], mode=r[3], display_order=json.loads(r[4]),
                      choice=r[5], winner=r[6], ranking=None if r[7] is None else json.loads(r[7]), reason=r[8],
                      seconds=max(0.0, r[10] - r[9]), labelled_at=r[10]) for r in rows]

    # ------------------------------------------------------------------ internals

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already ended it (a failed COMMIT may have)."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _live_label(self, task_id: int, annotator: str):
        return self._conn.execute("SELECT id FROM labels WHERE task_id = ? AND annotator = ? AND undone_at IS NULL",
                                  (task_id, annotator)).fetchone()

    def _taken(self, task_id: int, annotator: str, now: float) -> int:
        """Overlap slots of a task used by others: their live labels and unexpired assignments."""
        return self._conn.execute(
            "SELECT COUNT(*) FROM assignments a WHERE a.task_id = ? AND a.annotator != ? AND (EXISTS (SELECT 1 FROM "
            "labels l WHERE l.task_id = a.task_id AND l.annotator = a.annotator AND l.undone_at IS NULL) OR "
            "a.served_at > ?)", (task_id, annotator, now - LEASE_SECONDS)).fetchone()[0]

    def _pending(self, annotator: str, overlap: int, now: float) -> Shown | None:
        rows = self._conn.execute(
            "SELECT a.task_id, a.display_order, a.served_at FROM assignments a WHERE a.annotator = ? AND NOT EXISTS "
            "(SELECT 1 FROM labels l WHERE l.task_id = a.task_id AND l.annotator = a.annotator AND l.undone_at IS "
            "NULL) ORDER BY a.served_at DESC, a.task_id", (annotator,)).fetchall()
        for task_id, order, served_at in rows:
            if served_at <= now - LEASE_SECONDS and self._taken(task_id, annotator, now) >= overlap:
                # Their lease ran out and others filled the task meanwhile: let it go.
                self._conn.execute("DELETE FROM assignments WHERE task_id = ? AND annotator = ?", (task_id, annotator))
                continue
            self._conn.execute("UPDATE assignments SET served_at = ? WHERE task_id = ? AND annotator = ?",
                               (now, task_id, annotator))
            return Shown(task_id, self._task(task_id), json.loads(order))
        return None

    def _assign(self, annotator: str, overlap: int, rng: random.Random, now: float) -> Shown | None:
        row = self._conn.execute(
            "SELECT t.id, json_array_length(t.responses) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM assignments a "
            "WHERE a.task_id = t.id AND a.annotator = :me) AND (SELECT COUNT(*) FROM assignments a WHERE "
            "a.task_id = t.id AND a.annotator != :me AND (a.served_at > :fresh OR EXISTS (SELECT 1 FROM labels l "
            "WHERE l.task_id = a.task_id AND l.annotator = a.annotator AND l.undone_at IS NULL))) < :overlap "
            "ORDER BY t.id LIMIT 1", {"me": annotator, "fresh": now - LEASE_SECONDS, "overlap": overlap}).fetchone()
        if row is None:
            return None
        task_id, n = row
        order = rng.sample(range(n), n)
        self._conn.execute("INSERT INTO assignments (task_id, annotator, display_order, served_at) VALUES (?, ?, ?, ?)",
                           (task_id, annotator, _dump(order), now))
        return Shown(task_id, self._task(task_id), order)

    def _task(self, task_id: int) -> Task:
        r = self._conn.execute("SELECT line, mode, prompt, responses, response_index, meta FROM tasks WHERE id = ?",
                               (task_id,)).fetchone()
        return Task(line=r[0], mode=r[1], prompt=json.loads(r[2]), responses=json.loads(r[3]), response_index=r[4],
                    meta=json.loads(r[5]))


def _canonical(mode: str, choice: str, ranking: Sequence[int] | None,
               order: list[int]) -> tuple[str, int | None, list[int] | None]:
    """The page's answer (sides / display positions) -> ``(choice, winner, ranking)`` in canonical indices."""
    if choice not in CHOICES[mode]:
        raise StoreError(f"choice {choice!r} is not one of {', '.join(CHOICES[mode])} ({mode} task)", status=422)
    if choice == "rank":
        positions = list(ranking or [])
        if sorted(positions) != list(range(len(order))):
            raise StoreError(f"a ranking lists every shown position 0..{len(order) - 1} once, got {positions}",
                             status=422)
        return "rank", None, [order[p] for p in positions]
    if ranking:
        raise StoreError("a ranking is only sent with choice 'rank'", status=422)
    if choice in ("left", "right"):
        return "prefer", order[0 if choice == "left" else 1], None
    return choice, None, None


def refuse_folder(path: Path) -> None:
    """``ValueError`` when the labels database's path is a folder."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; the labels database is a file (e.g. {path / 'labels.sqlite'})")


def _open_error(path: Path, err: BaseException, readonly: bool) -> ValueError:
    """One line for a database SQLite (or the OS) would not open."""
    if type(err) is sqlite3.DatabaseError:  # "file is not a database"
        return ValueError(f"{path}: not a preftune labels database ({err})")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    needs = "readable" if readonly else "writable"
    return ValueError(f"{path}: cannot open the labels database ({reason}); the file and its folder must be {needs}")


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ServerLock:
    """An exclusive lock on ``DB.lock`` held for a server's lifetime; ``ValueError`` names the
    holder's pid when another server has it. Released by :meth:`release` or by the process dying."""

    def __init__(self, db_path: str | os.PathLike):
        import fcntl

        refuse_folder(Path(db_path))
        self.path = Path(f"{os.fspath(db_path)}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as err:
            raise ValueError(f"{self.path}: cannot make the lock file ({err.strerror or err}); --db must be in a "
                             "folder you can write") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise ValueError(f"{os.fspath(db_path)} is already being served (pid {holder}); one server per "
                             "database: stop it, or use another --db") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        import fcntl

        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
