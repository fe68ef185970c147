"""Majority-vote export: hand-counted outputs, dropped counts, and files preftune's own loader reads."""

from __future__ import annotations

import json

import pytest
from common.write_failures import deny_writes, fill_disk, one_error_line

from collect.test_store import FixedOrder, make_store
from preftune.cli.main import main
from preftune.collect.candidates import read_tasks
from preftune.collect.export import export_labels, majority
from preftune.data import load_dataset
from preftune.data.doctor import check_data

# Votes per pair task by ann, bob, cat: 0 / 1 = canonical response, "tie", "skip", None = not labelled.
VOTES = [
    (0, 0, 1),              # t0: chosen 0, agreement 2/3
    (0, 1, "tie"),          # t1: split vote
    ("tie", "tie", 0),      # t2: majority tie
    (1, 1, 1),              # t3: chosen 1, agreement 1
    ("skip", "skip", "skip"),  # t4: all skipped
    (0, "skip", "skip"),    # t5: one vote
]
N_TASKS = len(VOTES) + 1  # t6: nobody labels it


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def label_all(store, votes_by_task, annotators, overlap):
    for position, name in enumerate(annotators):
        for task_id, votes in enumerate(votes_by_task):
            vote = votes[position]
            if vote is None:
                continue
            order = [1, 0] if position % 2 else [0, 1]
            shown = store.next_task(name, overlap, rng=FixedOrder(order))
            assert shown.task_id == task_id
            if vote in ("tie", "skip"):
                store.submit(name, task_id, order, vote, reason="" if vote == "skip" else "same")
            else:
                store.submit(name, task_id, order, "left" if order[0] == vote else "right")


@pytest.fixture
def pair_db(tmp_path):
    rows = [{"prompt": f"prompt {i}", "responses": [f"first answer {i}", f"second answer {i}"], "meta": {"i": i}}
            for i in range(N_TASKS)]
    store = make_store(tmp_path, rows)
    label_all(store, VOTES, ["ann", "bob", "cat"], overlap=3)
    return store


def test_majority():
    assert majority([0, 0, 1]) == (0, pytest.approx(2 / 3))
    assert majority([0, 1]) == (None, 0.5)
    assert majority(["tie", "tie", 1]) == ("tie", pytest.approx(2 / 3))


def test_export_pairs_by_hand(pair_db, tmp_path, tiny_tokenizer):
    out = tmp_path / "pairs.jsonl"
    result = export_labels(pair_db, out)
    rows = read(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("prompt 0", "first answer 0", "second answer 0"),
        ("prompt 3", "second answer 3", "first answer 3"),
        ("prompt 5", "first answer 5", "second answer 5"),
    ]
    assert rows[0]["meta"]["votes"] == {"chosen": 2, "rejected": 1, "tie": 0}
    assert rows[0]["meta"]["agreement"] == pytest.approx(2 / 3, abs=1e-6)
    assert rows[0]["meta"]["annotators"] == ["ann", "bob", "cat"] and rows[0]["meta"]["candidate_meta"] == {"i": 0}
    assert rows[1]["meta"]["chosen_index"] == 1
    assert (result.tasks, result.tasks_kept, result.written) == (N_TASKS, 3, 3)
    assert result.dropped == {"split vote": 1, "majority tie": 1, "all skipped": 1, "unlabelled": 1}
    assert "3 pairs rows from 3 tasks" in result.summary() and "1 split vote" in result.summary()
    # preftune's own readers take it as it is: the training loader and the data doctor
    examples, report = load_dataset(out, tiny_tokenizer, "pair")
    assert len(examples) == 3 and report.bad_records == 0 and report.prompt_sources == {"explicit": 3}
    assert check_data(out).exit_code == 0


def test_export_thresholds(pair_db, tmp_path):
    """--min-votes 2 drops t5 (one vote); --min-agreement 0.7 drops t0 (2/3)."""
    out = tmp_path / "strict.jsonl"
    result = export_labels(pair_db, out, min_votes=2, min_agreement=0.7)
    assert [r["prompt"] for r in read(out)] == ["prompt 3"]
    assert result.dropped == {"split vote": 1, "majority tie": 1, "all skipped": 1, "unlabelled": 1,
                              "fewer than 2 votes": 1, "agreement under 0.7": 1}


def test_export_kto_and_ranked(pair_db, tmp_path, tiny_tokenizer):
    kto = tmp_path / "kto.jsonl"
    assert export_labels(pair_db, kto, to="kto").written == 6
    rows = read(kto)
    assert [(r["completion"], r["label"]) for r in rows[:2]] == [("first answer 0", True), ("second answer 0", False)]
    assert [r["label"] for r in rows] == [True, False] * 3
    examples, report = load_dataset(kto, tiny_tokenizer, "unpaired")
    assert len(examples) == 6 and report.bad_records == 0
    ranked = tmp_path / "ranked.jsonl"
    export_labels(pair_db, ranked, to="ranked")
    assert read(ranked)[1]["responses"] == ["second answer 3", "first answer 3"]


def test_rank_tasks(tmp_path, tiny_tokenizer):
    """Rankings of x, y, z: ann x>y>z, bob x>z>y, cat y>x>z.
    Pairs by majority: (x,y) x 2/3, (x,z) x 3/3, (y,z) y 2/3 -> x>y, x>z, y>z.
    Mean ranks x (0+0+1)/3, y (1+2+0)/3, z (2+1+2)/3 -> consensus x, y, z; KTO: x true, z false."""
    store = make_store(tmp_path, [{"prompt": "rank these", "responses": ["x is it", "y is it", "z is it"]}])
    for name, ranking in (("ann", [0, 1, 2]), ("bob", [0, 2, 1]), ("cat", [1, 0, 2])):
        shown = store.next_task(name, 3, rng=FixedOrder([2, 1, 0]))
        store.submit(name, shown.task_id, [2, 1, 0], "rank", ranking=[2 - r for r in ranking])  # positions
    out = tmp_path / "pairs.jsonl"
    result = export_labels(store, out, to="pairs")
    assert [(r["chosen"][0], r["rejected"][0]) for r in read(out)] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert [r["meta"]["agreement"] for r in read(out)] == pytest.approx([2 / 3, 1.0, 2 / 3], abs=1e-6)
    assert result.written == 3 and result.tasks_kept == 1
    assert load_dataset(out, tiny_tokenizer, "pair")[1].bad_records == 0
    strict = export_labels(store, tmp_path / "strict.jsonl", min_agreement=0.9)
    assert strict.written == 1 and strict.dropped == {"response pairs: agreement under 0.9": 2}
    export_labels(store, tmp_path / "ranked.jsonl", to="ranked")
    (row,) = read(tmp_path / "ranked.jsonl")
    assert [r[0] for r in row["responses"]] == ["x", "y", "z"]
    assert row["meta"]["mean_rank"] == pytest.approx([1 / 3, 1.0, 5 / 3], abs=1e-6)
    export_labels(store, tmp_path / "kto.jsonl", to="kto")
    assert [(r["completion"][0], r["label"]) for r in read(tmp_path / "kto.jsonl")] == [("x", True), ("z", False)]


def test_thumbs_tasks(tmp_path, tiny_tokenizer):
    store = make_store(tmp_path, [{"prompt": "p0", "completion": "fine"}, {"prompt": "p1", "completion": "meh"}])
    for name, votes in (("ann", ["up", "up"]), ("bob", ["up", "down"]), ("cat", ["down", None])):
        for vote in votes:
            if vote is not None:
                shown = store.next_task(name, 3)
                store.submit(name, shown.task_id, [0], vote)
    out = tmp_path / "kto.jsonl"
    result = export_labels(store, out, to="kto")
    assert [(r["prompt"], r["label"]) for r in read(out)] == [("p0", True)]
    assert result.dropped == {"split vote": 1}
    assert load_dataset(out, tiny_tokenizer, "unpaired")[1].bad_records == 0
    with_pairs = export_labels(store, tmp_path / "none.jsonl", to="pairs")
    assert with_pairs.written == 0 and with_pairs.dropped == {"thumbs tasks (export them with --to kto)": 2}


def test_export_cli_then_data_check_then_train(pair_db, tmp_path, tiny_model_dir, capsys):
    """The end of the loop: label export -> preftune data check -> preftune train."""
    db = tmp_path / "labels.sqlite"
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    assert "3 pairs rows from 3 tasks" in capsys.readouterr().out
    assert main(["data", "check", str(out)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(out), "--output-dir", str(run),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--max-prompt-length", "32",
                 "--no-progress", "-q"]) == 0
    assert (run / "model.safetensors").exists()
    assert main(["label", "export", "--db", str(db), "--out", str(tmp_path / "x.jsonl"), "--min-votes", "4"]) == 1
    assert main(["label", "export", "--db", str(db), "--out", str(db)]) == 1  # never over the database
    assert "output must end in" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["unwritable", "full"])
def test_export_into_an_unwritable_folder_or_onto_a_full_disk_is_one_line(pair_db, tmp_path, capsys, failure):
    """Issue 33, finding 5: a PermissionError / OSError traceback before."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "pairs.jsonl.gz"
    with deny_writes(folder) if failure == "unwritable" else fill_disk(folder):
        assert main(["label", "export", "--db", str(tmp_path / "labels.sqlite"), "--out", str(out)]) == 1
    line = one_error_line(capsys, out)
    assert line.endswith(f"cannot write {out}: permission denied") if failure == "unwritable" else \
        line.startswith(f"preftune: error: no space left on device writing {out} (")
    assert list(folder.iterdir()) == []


def test_an_export_with_no_row_leaves_no_file(pair_db, tmp_path, capsys):
    """Exit 1 with nothing to write: no empty file (and an earlier export is left as it was)."""
    out = tmp_path / "x.jsonl"
    assert main(["label", "export", "--db", str(tmp_path / "labels.sqlite"), "--out", str(out),
                 "--min-votes", "4"]) == 1
    assert not out.exists() and "-> 0 pairs rows" in capsys.readouterr().out
    out.write_text('{"old": 1}\n')
    assert export_labels(tmp_path / "labels.sqlite", out, min_votes=4).written == 0
    assert out.read_text() == '{"old": 1}\n'


# ----------------------------------------------------------------------------- ranked rows are response groups


def test_ranked_export_reads_as_response_groups(pair_db, tmp_path, tiny_tokenizer):
    """Pair tasks as [chosen, rejected] with ranks [1, 2]: groups scored 1 and 0 (ranks -> max(ranks) - rank)."""
    ranked = tmp_path / "ranked.jsonl"
    export_labels(pair_db, ranked, to="ranked")
    rows = read(ranked)
    assert [(r["responses"], r["ranks"]) for r in rows] == [(["first answer 0", "second answer 0"], [1, 2]),
                                                           (["second answer 3", "first answer 3"], [1, 2]),
                                                           (["first answer 5", "second answer 5"], [1, 2])]
    examples, report = load_dataset(ranked, tiny_tokenizer, "group")
    assert report.bad_records == 0 and [ex.scores for ex in examples] == [[1.0, 0.0]] * 3
    assert len(read_tasks(ranked)) == 3  # a candidates file again


def test_ranked_rank_task_has_its_mean_ranks_and_ties_and_trains(tmp_path, tiny_tokenizer, tiny_model_dir, capsys):
    """Mean ranks as in test_rank_tasks (x 1/3, y 1, z 5/3: ranks 4/3, 2, 8/3, scores 4/3, 2/3, 0); a task
    whose two annotators rank u, v in opposite orders ties them; empty responses are left out."""
    store = make_store(tmp_path, [{"prompt": "rank these", "responses": ["x is it", "y is it", "z is it"]},
                                  {"prompt": "tied", "responses": ["u is it", "v is it", " ", "w is it"]},
                                  {"prompt": "mostly empty", "responses": ["", "only", "  "]}])
    rankings = {0: {"ann": [0, 1, 2], "bob": [0, 2, 1], "cat": [1, 0, 2]},  # best first, canonical indices
                1: {"ann": [0, 1, 3, 2], "bob": [1, 0, 3, 2], "cat": None},
                2: {"ann": [1, 0, 2], "bob": None, "cat": None}}
    for name in ("ann", "bob", "cat"):
        while True:
            shown = store.next_task(name, 3, rng=FixedOrder())  # shown in canonical order
            if shown is None:
                break
            best_first = rankings[shown.task_id][name]
            if best_first is None:
                store.submit(name, shown.task_id, shown.display_order, "skip")
                continue
            store.submit(name, shown.task_id, shown.display_order, "rank", ranking=best_first)
    out = tmp_path / "ranked.jsonl"
    result = export_labels(store, out, to="ranked")
    rows = read(out)
    assert [r["responses"] for r in rows] == [["x is it", "y is it", "z is it"], ["u is it", "v is it", "w is it"]]
    assert rows[0]["ranks"] == pytest.approx([4 / 3, 2.0, 8 / 3], abs=1e-6)
    assert rows[1]["ranks"] == [1.5, 1.5, 3.0]
    assert result.dropped == {"ranked: empty responses left out": 3, "unusable responses (empty or identical)": 1}
    examples, report = load_dataset(out, tiny_tokenizer, "group")
    assert report.bad_records == 0
    assert examples[0].scores == pytest.approx([4 / 3, 2 / 3, 0.0], abs=1e-5)
    assert examples[1].scores == [1.5, 1.5, 0.0]
    run = tmp_path / "run"  # preftune train reads the export directly, as groups
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(out), "--output-dir", str(run),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--no-progress", "-q"]) == 0
    assert (run / "model.safetensors").exists()
