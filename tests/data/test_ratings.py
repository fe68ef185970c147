"""``preftune data pairs``: scored responses -> pairs, KTO rows or response groups, counted by hand."""

from __future__ import annotations

import json

import pytest
from common.write_failures import deny_writes, fill_disk, one_error_line

from preftune.cli.main import main
from preftune.data import load_dataset
from preftune.data.doctor import check_data
from preftune.data.ratings import parse_score, score_pairs

ULTRAFEEDBACK = [
    {"instruction": "Q1", "models": ["a", "b", "c", "d"], "completions": [
        {"model": "a", "response": "R1a", "overall_score": 7.5},
        {"model": "b", "response": "R1b", "overall_score": 3},
        {"model": "c", "response": "R1c", "overall_score": 7.5},
        {"model": "d", "response": "R1d", "overall_score": 5}]},
    {"instruction": "Q2", "completions": [{"response": "R2a", "overall_score": 4},
                                          {"response": "R2b", "overall_score": 4}]},
    {"instruction": "Q3", "completions": [{"response": "R3a", "overall_score": "N/A"},
                                          {"response": "R3b", "overall_score": 2},
                                          {"response": "R3c", "overall_score": 9}]},
    '{"instruction": "Q4", "completions": [',  # a broken line
    {"instruction": "Q5", "completions": [{"response": "  ", "overall_score": 5},
                                          {"response": "R5b", "overall_score": 1}]},
]

CSAT = [
    {"conversation_id": "c1", "prompt": "My order is late", "response": "Sorry! It ships today.", "csat": 5},
    {"conversation_id": "c1", "prompt": "My order is late", "response": "Wait.", "csat": 1},
    {"conversation_id": "c2", "prompt": "Reset password?", "response": "Click 'forgot password'.", "csat": "4"},
    {"conversation_id": "c2", "prompt": "Reset password?", "response": "Read the docs.", "csat": 2},
    {"conversation_id": "c2", "prompt": "Reset password?", "response": "Here is a link.", "csat": 4},
    {"conversation_id": "c3", "prompt": "Hours?", "response": "9 to 5.", "csat": 3},
    {"conversation_id": "c4", "prompt": "Refund?", "response": "Yes.", "csat": 3},
    {"conversation_id": "c4", "prompt": "Refund?", "response": "Sure, done.", "csat": 3},
    {"prompt": "no id", "response": "x", "csat": 1},
]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def uf(tmp_path):
    return write(tmp_path / "ultrafeedback.jsonl", ULTRAFEEDBACK)


def test_ultrafeedback_best_vs_worst(uf, tmp_path, tiny_tokenizer):
    """Q1: best R1a (7.5, the first of two), worst R1b (3). Q2: 4 = 4, a tie. Q3: R3a's "N/A" is not a
    score; R3c (9) vs R3b (2). Line 4 is broken. Q5: the blank response is dropped, one is left."""
    out = tmp_path / "pairs.jsonl"
    result = score_pairs(uf, out, score_field="overall_score")
    assert [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in read(out)] == [
        ("Q1", "R1a", "R1b", 7.5, 3.0), ("Q3", "R3c", "R3b", 9.0, 2.0)]
    assert (result.rows_read, result.bad_records, result.groups, result.responses, result.written) == (5, 1, 4, 9, 2)
    assert result.bad_record_samples[0].startswith(f"{uf}:4: invalid JSON")
    assert result.dropped == {"groups whose scores all tie": 1, "responses without a numeric score": 1,
                              "empty responses": 1, "groups with fewer than 2 scored responses": 1}
    examples, report = load_dataset(out, tiny_tokenizer, "pair")
    assert len(examples) == 2 and report.bad_records == 0
    assert check_data(out).exit_code == 0


def test_ultrafeedback_all_pairs_and_margin(uf, tmp_path):
    """All pairs of Q1 (a 7.5, b 3, c 7.5, d 5): a>b, a>d, c>b, d>b, c>d; a=c tied. Q2: one tied pair.
    Q3: c>b. -> 6 pairs, 2 tied. With margin 3: a>b (4.5), c>b (4.5), Q3 c>b (7) are kept;
    a-d (2.5), b-d (2), c-d (2.5) are under it."""
    out = tmp_path / "all.jsonl"
    result = score_pairs(uf, out, score_field="overall_score", strategy="all")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in read(out)] == [
        ("Q1", "R1a", "R1b"), ("Q1", "R1a", "R1d"), ("Q1", "R1c", "R1b"), ("Q1", "R1d", "R1b"), ("Q1", "R1c", "R1d"),
        ("Q3", "R3c", "R3b")]
    assert result.dropped["tied pairs"] == 2
    result = score_pairs(uf, out, score_field="overall_score", strategy="all", margin=3)
    assert [(r["chosen"], r["rejected"]) for r in read(out)] == [("R1a", "R1b"), ("R1c", "R1b"), ("R3c", "R3b")]
    assert result.dropped["pairs under margin 3"] == 3 and result.dropped["tied pairs"] == 2


def test_best_vs_random_is_seeded_per_prompt(uf, tmp_path):
    """Q1's best R1a against R1b or R1d (R1c ties it, so never); Q3: R3c against R3b, the only one below.
    The draw depends on the seed and the prompt, not on the file's order."""
    out = tmp_path / "random.jsonl"
    score_pairs(uf, out, score_field="overall_score", strategy="best-random", seed=3)
    first = read(out)
    assert first[0]["chosen"] == "R1a" and first[0]["rejected"] in ("R1b", "R1d")
    assert (first[1]["chosen"], first[1]["rejected"]) == ("R3c", "R3b")
    reordered = write(tmp_path / "reordered.jsonl", list(reversed(ULTRAFEEDBACK)))
    score_pairs(reordered, tmp_path / "again.jsonl", score_field="overall_score", strategy="best-random", seed=3)
    assert sorted(map(json.dumps, read(tmp_path / "again.jsonl"))) == sorted(map(json.dumps, first))
    drawn = set()
    for seed in range(20):
        score_pairs(uf, out, score_field="overall_score", strategy="best-random", seed=seed)
        drawn.add(read(out)[0]["rejected"])
    assert drawn == {"R1b", "R1d"}


def test_kto_by_threshold(uf, tmp_path, tiny_tokenizer):
    """Threshold 5: Q1 7.5 T, 3 F, 7.5 T, 5 T; Q2 4 F, 4 F; Q3 2 F, 9 T; Q5 1 F -> 9 rows, 4 true.
    --reject-below 4 drops Q2's two 4s (between 4 and 5)."""
    out = tmp_path / "kto.jsonl"
    result = score_pairs(uf, out, score_field="overall_score", to="kto", threshold=5)
    rows = read(out)
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("R1a", True), ("R1b", False), ("R1c", True), ("R1d", True), ("R2a", False), ("R2b", False),
        ("R3b", False), ("R3c", True), ("R5b", False)]
    assert result.written == 9
    examples, report = load_dataset(out, tiny_tokenizer, "unpaired")
    assert len(examples) == 9 and report.bad_records == 0
    result = score_pairs(uf, out, score_field="overall_score", to="kto", threshold=5, reject_below=4)
    assert result.written == 7 and result.dropped["responses between --reject-below and --threshold"] == 2
    with pytest.raises(ValueError, match="needs --threshold"):
        score_pairs(uf, out, score_field="overall_score", to="kto")


def test_csat_grouped_by_conversation(tmp_path, tiny_tokenizer):
    """c1: 5 vs 1. c2: best 'Click' (4, before the other 4), worst 'Read the docs.' (2). c3: one
    response. c4: 3 = 3, a tie. The last row has no conversation_id: a bad record."""
    src = write(tmp_path / "csat.jsonl", CSAT)
    out = tmp_path / "pairs.jsonl"
    result = score_pairs(src, out, score_field="csat", group_by="conversation_id")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in read(out)] == [
        ("My order is late", "Sorry! It ships today.", "Wait."),
        ("Reset password?", "Click 'forgot password'.", "Read the docs.")]
    assert result.groups == 4 and result.bad_records == 1
    assert "group field 'conversation_id' is missing" in result.bad_record_samples[0]
    assert result.dropped == {"groups with fewer than 2 scored responses": 1, "groups whose scores all tie": 1}
    assert load_dataset(out, tiny_tokenizer, "pair")[1].bad_records == 0
    # grouped by prompt text instead, the id-less row is a group of its own
    by_prompt = score_pairs(src, out, score_field="csat")
    assert by_prompt.groups == 5 and by_prompt.bad_records == 0 and by_prompt.written == 2
    assert by_prompt.dropped == {"groups with fewer than 2 scored responses": 2, "groups whose scores all tie": 1}


def test_thumbs_log_and_parallel_lists(tmp_path):
    thumbs = write(tmp_path / "thumbs.jsonl", [{"prompt": "Q", "response": "good one", "thumbs": "up"},
                                              {"prompt": "Q", "response": "bad one", "thumbs": "down"},
                                              {"prompt": "R", "response": "meh", "thumbs": True}])
    score_pairs(thumbs, tmp_path / "kto.jsonl", score_field="thumbs", to="kto", threshold=1)
    assert [(r["completion"], r["label"]) for r in read(tmp_path / "kto.jsonl")] == [
        ("good one", True), ("bad one", False), ("meh", True)]
    score_pairs(thumbs, tmp_path / "pairs.jsonl", score_field="thumbs")
    assert [(r["chosen"], r["rejected"]) for r in read(tmp_path / "pairs.jsonl")] == [("good one", "bad one")]
    parallel = write(tmp_path / "parallel.jsonl", [{"prompt": "p", "responses": ["x", "y", "z"], "scores": [1, 3, 2]}])
    score_pairs(parallel, tmp_path / "p.jsonl", score_field="scores")
    assert [(r["chosen"], r["rejected"]) for r in read(tmp_path / "p.jsonl")] == [("y", "x")]
    nested = write(tmp_path / "nested.jsonl", [{"prompt": "p", "completions": [
        {"text": "a", "annotations": {"helpfulness": {"Rating": "4"}}},
        {"text": "b", "annotations": {"helpfulness": {"Rating": "2"}}}]}])
    score_pairs(nested, tmp_path / "n.jsonl", score_field="annotations.helpfulness.Rating")
    assert [(r["chosen"], r["rejected"]) for r in read(tmp_path / "n.jsonl")] == [("a", "b")]


def test_parse_score():
    assert [parse_score(v) for v in (3, 2.5, "4", " 1.5 ", True, "up", "Down", "N/A", None, float("nan"), [1])] == [
        3.0, 2.5, 4.0, 1.5, 1.0, 1.0, 0.0, None, None, None, None]


def test_cli(uf, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", str(uf), str(out), "--score-field", "overall_score", "--strategy", "all",
                 "--margin", "3"]) == 0
    printed = capsys.readouterr().out
    assert "-> 3 pairs (all) written to" in printed and "2 tied pairs" in printed
    assert main(["data", "pairs", str(uf), str(out), "--score-field", "no_such_field"]) == 1  # nothing written
    assert "11 responses without a numeric score" in capsys.readouterr().out  # 4 + 2 + 3 + 2
    assert main(["data", "pairs", str(uf), str(uf), "--score-field", "overall_score"]) == 1
    assert "overwrite the input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "pairs", str(uf), str(out)])  # --score-field is required
    with pytest.raises(SystemExit):
        main(["data", "pairs", str(uf), str(out), "--score", "overall_score"])  # no abbreviations


def test_no_pair_to_write_leaves_no_file(uf, tmp_path, capsys):
    """Issue 33, finding 6: a run with no output row exited 1 but left an empty output file. Now it
    writes nothing: no new file, and an earlier output stays as it was."""
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", str(uf), str(out), "--score-field", "no_such_field"]) == 1
    assert not out.exists() and "-> 0 pairs (best-worst) written to" in capsys.readouterr().out
    out.write_text('{"old": 1}\n')
    assert main(["data", "pairs", str(uf), str(out), "--score-field", "no_such_field", "--to", "kto",
                 "--threshold", "5"]) == 1
    assert out.read_text() == '{"old": 1}\n'
    assert "-> 0 KTO rows written to" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--margin", "nan"), ("--margin", "inf"), ("--margin", "-1"),
                                         ("--threshold", "nan"), ("--reject-below", "-inf")])
def test_a_margin_or_threshold_that_is_not_a_finite_number_is_refused(uf, tmp_path, capsys, flag, value):
    """Issue 33, finding 6: ``--margin nan`` was accepted (every comparison with NaN is false)."""
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as refused:
        main(["data", "pairs", str(uf), str(out), "--score-field", "overall_score", "--to", "kto",
              "--threshold", "5", f"{flag}={value}"])
    assert refused.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0] and repr(value) in errors[0], errors
    assert not out.exists()
    keyword = {"--margin": "margin", "--threshold": "threshold", "--reject-below": "reject_below"}[flag]
    with pytest.raises(ValueError, match=f"{flag} must be a finite number"):
        score_pairs(uf, out, score_field="overall_score", to="kto", **{"threshold": 5, keyword: float(value)})


@pytest.mark.parametrize("failure", ["unwritable", "full"])
def test_an_unwritable_folder_or_a_full_disk_is_one_line(uf, tmp_path, capsys, failure):
    """Issue 33, finding 5: a traceback before."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "pairs.jsonl"
    with deny_writes(folder) if failure == "unwritable" else fill_disk(folder):
        assert main(["data", "pairs", str(uf), str(out), "--score-field", "overall_score"]) == 1
    line = one_error_line(capsys, out)
    assert "permission denied" in line if failure == "unwritable" else "no space left on device" in line
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- --to groups


def test_ultrafeedback_to_groups_read_as_groups(uf, tmp_path, tiny_tokenizer):
    """Every scored response of a prompt in one group, ties kept (Q1's 7.5s, Q2 all tied); Q3's "N/A"
    and Q5's blank response left out (Q5 then has one: dropped); the broken Q4 line a bad record."""
    out = tmp_path / "groups.jsonl"
    result = score_pairs(uf, out, score_field="overall_score", to="groups")
    assert read(out) == [{"prompt": "Q1", "responses": ["R1a", "R1b", "R1c", "R1d"], "scores": [7.5, 3.0, 7.5, 5.0]},
                         {"prompt": "Q2", "responses": ["R2a", "R2b"], "scores": [4.0, 4.0]},
                         {"prompt": "Q3", "responses": ["R3b", "R3c"], "scores": [2.0, 9.0]}]
    assert (result.written, result.groups, result.bad_records) == (3, 4, 1)
    assert result.dropped == {"responses without a numeric score": 1, "empty responses": 1,
                              "groups with fewer than 2 scored responses": 1}
    assert "-> 3 response groups written to" in result.summary()
    examples, report = load_dataset(out, tiny_tokenizer, "group")
    assert report.bad_records == 0
    assert [ex.scores for ex in examples] == [[7.5, 3.0, 7.5, 5.0], [4.0, 4.0], [2.0, 9.0]]
    assert [len(ex.completions) for ex in examples] == [4, 2, 2]
    pair_read, _ = load_dataset(out, tiny_tokenizer, "pair")  # a pair loss reads it as groups too
    assert [ex.scores for ex in pair_read] == [ex.scores for ex in examples]


def test_ultrafeedback_raw_file_reads_as_groups_and_bad_rows_name_file_and_line(uf, tiny_tokenizer):
    """The raw UltraFeedback file itself is a group file: its good rows are groups with their overall_score;
    its bad rows are one line each naming file:line (a non-numeric score, a broken line, an empty response)."""
    examples, report = load_dataset(uf, tiny_tokenizer, "group", skip_bad_records=True)
    assert [ex.scores for ex in examples] == [[7.5, 3.0, 7.5, 5.0], [4.0, 4.0]]
    assert report.bad_records == 3
    assert report.bad_record_samples[0] == (f"{uf}:3: field 'completions[0].overall_score' must be a finite "
                                            "number, got 'N/A'")
    assert report.bad_record_samples[1].startswith(f"{uf}:4: ")
    assert report.bad_record_samples[2] == f"{uf}:5: field 'responses[0]' is empty or whitespace only"


def test_csat_to_groups_by_conversation_and_the_cli(tmp_path, tiny_tokenizer, capsys):
    src = write(tmp_path / "csat.jsonl", CSAT)
    out = tmp_path / "groups.jsonl"
    assert main(["data", "pairs", str(src), str(out), "--score-field", "csat", "--group-by", "conversation_id",
                 "--to", "groups"]) == 0
    printed = capsys.readouterr().out
    assert "9 rows, 8 scored responses in 4 groups -> 3 response groups written to" in printed
    assert "1 groups with fewer than 2 scored responses" in printed and "1 bad records" in printed
    assert [(r["prompt"], r["scores"]) for r in read(out)] == [("My order is late", [5.0, 1.0]),
                                                              ("Reset password?", [4.0, 2.0, 4.0]),
                                                              ("Refund?", [3.0, 3.0])]
    examples, _ = load_dataset(out, tiny_tokenizer, "group")
    assert [len(ex.completions) for ex in examples] == [2, 3, 2]
    for flags, refused in ((["--strategy", "all"], "--strategy all chooses pairs"),
                           (["--margin", "1"], "--margin 1 chooses pairs")):
        assert main(["data", "pairs", str(src), str(tmp_path / "x.jsonl"), "--score-field", "csat", "--to", "groups",
                     *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("preftune: error: ") and refused in err and "\n" not in err
    assert not (tmp_path / "x.jsonl").exists()
