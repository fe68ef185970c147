"""``preftune data split`` on response groups: a group is one record, kept whole on one side, grouped by
its prompt with the pairs that share it; bad groups are skipped and named by file:line."""

from __future__ import annotations

import json

from conftest import write_jsonl

from preftune.cli.main import main
from preftune.data import load_dataset, read_rows
from preftune.data.split import prompt_key, split


def rows_of(path) -> list[dict]:
    return [row for _, row in read_rows(path)]


def group_rows(n_prompts: int) -> list[dict]:
    """Groups of 2-4 responses (scores or ranks, a tie), UltraFeedback raw rows, and a pair sharing a prompt."""
    rows = []
    for i in range(n_prompts):
        k = 2 + i % 3
        if i % 4 == 3:
            rows.append({"instruction": f"Question {i}?", "completions": [
                {"response": f"answer {i}.{j}", "overall_score": j % 2} for j in range(k)]})
        elif i % 2:
            rows.append({"prompt": f"Question {i}?", "responses": [f" answer {j}" for j in range(k)],
                         "ranks": list(range(1, k + 1))})
        else:
            rows.append({"prompt": f"Question {i}?", "responses": [f" answer {j}" for j in range(k)],
                         "scores": [float(j % 2) for j in range(k)]})
    rows.append({"prompt": "QUESTION 0!", "chosen": " other", "rejected": " worse"})  # shares group 0's prompt
    return rows


def test_split_keeps_each_group_whole_and_no_prompt_on_both_sides(tmp_path, tiny_tokenizer):
    rows = group_rows(30)
    src = write_jsonl(tmp_path / "groups.jsonl", rows)
    result = split(src, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", eval_fraction=0.2, seed=1)
    train, held_out = rows_of(tmp_path / "train.jsonl"), rows_of(tmp_path / "eval.jsonl")
    assert (result.rows_read, result.bad_records, result.train_rows + result.eval_rows) == (31, 0, 31)
    assert result.eval_rows == 6 and result.train_prompts + result.eval_prompts == 30

    def prompts(side):
        return {prompt_key(r.get("prompt", r.get("instruction"))) for r in side}

    assert not prompts(train) & prompts(held_out)
    assert sorted(map(json.dumps, train + held_out)) == sorted(map(json.dumps, rows))  # records unchanged, whole
    for path, side in ((tmp_path / "train.jsonl", train), (tmp_path / "eval.jsonl", held_out)):
        examples, report = load_dataset(path, tiny_tokenizer, "group")
        assert report.bad_records == 0 and len(examples) == len(side)
        assert sorted(len(ex.completions) for ex in examples) == sorted(
            len(r.get("responses", r.get("completions", [0, 0]))) for r in side)  # the pair: a group of two
    again = split(src, tmp_path / "t2.jsonl", tmp_path / "e2.jsonl", eval_fraction=0.2, seed=1)
    assert again == result and (tmp_path / "e2.jsonl").read_bytes() == (tmp_path / "eval.jsonl").read_bytes()


def test_bad_groups_are_skipped_and_named_by_file_and_line(tmp_path, capsys):
    rows = group_rows(6)
    rows[1:1] = [{"prompt": "q1", "responses": ["only"], "scores": [1]},
                 {"prompt": "q2", "responses": ["a", "b", "c"], "scores": [1, 2]},
                 {"prompt": "q3", "responses": ["a", "b"], "ranks": ["first", 2]}]
    src = write_jsonl(tmp_path / "groups.jsonl", rows)
    assert main(["data", "split", str(src), "--train", str(tmp_path / "tr.jsonl"), "--eval",
                 str(tmp_path / "ev.jsonl"), "--eval-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "10 rows -> train 5 (" in printed and ", eval 2 (" in printed and "3 bad records skipped" in printed
    result = split(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", eval_size=2)
    assert result.bad_record_samples == [
        f"{src}:2: field 'responses' holds 1 response(s); a group needs at least 2",
        f"{src}:3: field 'scores' has 2 value(s) for 3 responses",
        f"{src}:4: field 'ranks[0]' must be a finite number, got 'first'"]
    assert len(rows_of(tmp_path / "a.jsonl")) + len(rows_of(tmp_path / "b.jsonl")) == 7
