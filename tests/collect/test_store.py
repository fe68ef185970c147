"""Candidates files -> tasks, and the SQLite store: assignment, overlap, undo, resume, durability."""

from __future__ import annotations

import json
import sqlite3

import pytest

from preftune.collect.candidates import read_tasks
from preftune.collect.store import LabelStore, ServerLock, StoreError
from preftune.data.errors import DataError


class FixedOrder:
    """Stands in for the store's RNG: shows responses in a chosen order."""

    def __init__(self, order=None):
        self.order = order

    def sample(self, population, k):
        return list(self.order) if self.order is not None else list(population)[:k]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_store(tmp_path, rows, mode="auto", name="labels.sqlite"):
    candidates = write(tmp_path / "candidates.jsonl", rows)
    store = LabelStore(tmp_path / name)
    store.load_tasks(read_tasks(candidates, mode), candidates, "sha", mode)
    return store


PAIRS = [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(4)]


# ----------------------------------------------------------------------------- candidates


def test_every_candidates_shape_becomes_tasks(tmp_path):
    rows = [
        {"prompt": "two", "responses": ["x", "y"], "meta": {"model": "m"}},
        {"prompt": "three", "responses": ["x", "yy", "zzz"]},
        {"prompt": "pair", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"prompt": [{"role": "user", "content": "chat"}], "responses": [[{"role": "assistant", "content": "a"}],
                                                                        [{"role": "assistant", "content": "b"}]]},
        {"prompt": "one", "completion": "only", "label": True},
    ]
    tasks = read_tasks(write(tmp_path / "c.jsonl", rows))
    assert [t.mode for t in tasks] == ["pair", "rank", "pair", "pair", "pair", "thumbs"]
    assert [t.line for t in tasks] == [1, 2, 3, 4, 5, 6]
    assert tasks[0].meta == {"model": "m"}
    assert tasks[2].responses == ["good", "bad"] and tasks[2].meta == {"chosen_index": 0}
    assert tasks[3].prompt == "\n\nHuman: hi\n\nAssistant:" and tasks[3].responses == [" hello", " go away"]
    # thumbs mode: one task per response, remembering which
    thumbs = read_tasks(tmp_path / "c.jsonl", mode="thumbs")
    assert len(thumbs) == 2 + 3 + 2 + 2 + 2 + 1
    assert [t.response_index for t in thumbs[:2]] == [0, 1] and thumbs[-1].response_index is None


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "responses": ["a", "b"]', "invalid JSON"),
    ('{"responses": ["a", "b"]}', "'prompt' is missing"),
    ('{"prompt": "p", "responses": []}', "non-empty list"),
    ('{"prompt": "p", "responses": ["a", 3]}', "responses[1]"),
    ('{"prompt": "p", "responses": ["a", "b"], "meta": [1]}', "'meta' must be an object"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical"),
    ('{"text": "what"}', "not a candidates record"),
    ('{"prompt": "p", "responses": ["1","2","3","4","5","6","7","8","9","10"]}', "2 to 9"),
])
def test_a_bad_line_is_one_error_with_its_place(tmp_path, line, message):
    path = write(tmp_path / "c.jsonl", [PAIRS[0], line])
    with pytest.raises(DataError) as err:
        read_tasks(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_pair_mode_refuses_three_responses(tmp_path):
    path = write(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: pair mode shows two responses"):
        read_tasks(path, mode="pair")


# ----------------------------------------------------------------------------- the store


def test_wal_mode_and_full_sync(tmp_path):
    store = make_store(tmp_path, PAIRS)
    conn = sqlite3.connect(tmp_path / "labels.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_label_undo_and_resume(tmp_path):
    store = make_store(tmp_path, PAIRS)
    shown = store.next_task("ann", overlap=1, rng=FixedOrder([1, 0]))
    assert (shown.task_id, shown.display_order) == (0, [1, 0])
    # asking again (a reload, a closed tab) gives the same task in the same order
    assert store.next_task("ann", 1, rng=FixedOrder([0, 1])) == shown
    store.submit("ann", 0, [1, 0], "left", reason="clearer")  # left is canonical response 1
    (label,) = store.labels()
    assert (label.choice, label.winner, label.display_order, label.reason) == ("prefer", 1, [1, 0], "clearer")
    nxt = store.next_task("ann", 1, rng=FixedOrder([0, 1]))
    assert nxt.task_id == 1
    assert store.undo("ann") == 0
    assert store.labels() == [] and len(store.labels(include_undone=True)) == 1
    again = store.next_task("ann", 1, rng=FixedOrder([0, 1]))
    assert (again.task_id, again.display_order) == (0, [1, 0])  # the undone task, as it was shown
    store.submit("ann", 0, [1, 0], "tie")
    assert store.next_task("ann", 1).task_id == 1  # then the one that was waiting
    assert [(l.task_id, l.choice, l.winner) for l in store.labels()] == [(0, "tie", None)]
    assert store.undo("nobody") is None


def test_submit_is_checked(tmp_path):
    store = make_store(tmp_path, PAIRS + [{"prompt": "r", "responses": ["x", "y", "z"]}])
    with pytest.raises(StoreError, match="not shown"):
        store.submit("ann", 0, [0, 1], "left")
    store.next_task("ann", 1, rng=FixedOrder([0, 1]))
    with pytest.raises(StoreError, match="order"):
        store.submit("ann", 0, [1, 0], "left")
    with pytest.raises(StoreError, match="not one of"):
        store.submit("ann", 0, [0, 1], "up")
    store.submit("ann", 0, [0, 1], "right")
    with pytest.raises(StoreError, match="already labelled"):
        store.submit("ann", 0, [0, 1], "left")
    for _ in range(3):
        shown = store.next_task("ann", 1, rng=FixedOrder([0, 1]))
        store.submit("ann", shown.task_id, [0, 1], "skip")
    rank = store.next_task("ann", 1, rng=FixedOrder([2, 0, 1]))
    assert rank.task.mode == "rank"
    with pytest.raises(StoreError, match="every shown position"):
        store.submit("ann", rank.task_id, [2, 0, 1], "rank", ranking=[0, 0, 1])
    store.submit("ann", rank.task_id, [2, 0, 1], "rank", ranking=[1, 2, 0])  # positions: x, y, z best first
    assert store.labels()[-1].ranking == [0, 1, 2]
    assert store.next_task("ann", 1) is None


def test_overlap_gives_each_task_to_n_different_annotators(tmp_path):
    store = make_store(tmp_path, PAIRS)
    seen = {name: [] for name in ("a", "b", "c")}
    for _ in range(len(PAIRS)):
        for name in seen:
            shown = store.next_task(name, overlap=2)
            if shown is not None:
                seen[name].append(shown.task_id)
                store.submit(name, shown.task_id, shown.display_order, "left")
    while any(store.next_task(n, 2) for n in seen):  # whoever has something left finishes it
        for name in seen:
            shown = store.next_task(name, 2)
            if shown is not None:
                seen[name].append(shown.task_id)
                store.submit(name, shown.task_id, shown.display_order, "left")
    per_task = {t: sum(t in ids for ids in seen.values()) for t in range(len(PAIRS))}
    assert per_task == {t: 2 for t in range(len(PAIRS))}  # exactly two annotators each
    for ids in seen.values():
        assert len(ids) == len(set(ids))  # nobody saw a task twice
    assert store.progress("a", 2)["tasks_complete"] == len(PAIRS)


def test_a_shown_task_holds_its_slot_until_the_lease_ends(tmp_path):
    store = make_store(tmp_path, PAIRS[:1])
    assert store.next_task("a", 1, now=1000.0).task_id == 0
    assert store.next_task("b", 1, now=1001.0) is None  # a is looking at it
    later = 1000.0 + 31 * 60
    assert store.next_task("b", 1, now=later).task_id == 0  # a walked away: b gets it
    store.submit("b", 0, store.next_task("b", 1, now=later).display_order, "left", now=later + 5)
    assert store.next_task("a", 1, now=later + 10) is None  # a's stale view is let go, not labelled twice


def test_database_remembers_its_candidates_file(tmp_path):
    store = make_store(tmp_path, PAIRS)
    with pytest.raises(ValueError, match="different file or mode: use another --db"):
        store.load_tasks([], tmp_path / "candidates.jsonl", "other-sha", "auto")
    store.load_tasks([], tmp_path / "candidates.jsonl", "sha", "auto")  # the same file: carry on
    assert len(store.tasks()) == len(PAIRS)
    readonly = LabelStore(tmp_path / "labels.sqlite", readonly=True)
    assert len(readonly.tasks()) == len(PAIRS)
    (tmp_path / "not.sqlite").write_text("hello")
    with pytest.raises(ValueError, match="not a preftune labels database"):
        LabelStore(tmp_path / "not.sqlite", readonly=True)


def test_one_server_lock_per_database(tmp_path):
    first = ServerLock(tmp_path / "db.sqlite")
    with pytest.raises(ValueError, match=r"already being served \(pid \d+\)"):
        ServerLock(tmp_path / "db.sqlite")
    first.release()
    ServerLock(tmp_path / "db.sqlite").release()


def test_a_database_that_cannot_be_opened_is_one_error_naming_it(tmp_path, monkeypatch):
    """--db a folder, a file that is not SQLite, a folder SQLite may not write (simulated: root may write anywhere)."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"folder: is a folder"):
        LabelStore(tmp_path / "folder")
    (tmp_path / "text.sqlite").write_text("hello, not a database\n" * 100)
    with pytest.raises(ValueError, match=r"text.sqlite: not a preftune labels database"):
        LabelStore(tmp_path / "text.sqlite")
    real_connect = sqlite3.connect
    for refusal in (sqlite3.OperationalError("unable to open database file"),
                    PermissionError(13, "Permission denied")):
        def refused(path, *args, refusal=refusal, **kwargs):
            if "readonly" in str(path):
                raise refusal
            return real_connect(path, *args, **kwargs)

        monkeypatch.setattr(sqlite3, "connect", refused)
        with pytest.raises(ValueError, match=r"readonly/labels.sqlite: cannot open the labels database"):
            LabelStore(tmp_path / "readonly" / "labels.sqlite")


def test_a_lock_file_that_cannot_be_made_is_one_error_naming_it(tmp_path, monkeypatch):
    from preftune.collect import store as store_module

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_module, "open", refused, raising=False)
    with pytest.raises(ValueError, match=r"db.sqlite.lock: cannot make the lock file.*Permission denied"):
        ServerLock(tmp_path / "db.sqlite")
