"""``preftune data convert`` and ``preftune data split``: formats round trip into ``load_dataset``,
KTO doubles the rows with alternating labels, splits are grouped by prompt and seeded."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from common.write_failures import deny_writes, fill_disk, one_error_line
from conftest import write_jsonl

from preftune.cli.data import register
from preftune.cli.main import main
from preftune.data import load_dataset, read_rows
from preftune.data.convert import convert, dialogue_to_messages, messages_to_dialogue, write_rows
from preftune.data.split import normalize_text, prompt_key, split


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rows_of(path) -> list[dict]:
    return [row for _, row in read_rows(path)]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


DIALOGUE = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant: Blue.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant: Go away."}


# ------------------------------------------------------------------------------- text <-> messages


def test_dialogue_text_to_messages_and_back():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant:"
    messages = [user("Hi there"), assistant("Hello!"), user("Sky colour?")]  # the open Assistant turn dropped
    assert dialogue_to_messages(prompt) == messages
    assert messages_to_dialogue(messages) + "\n\nAssistant:" == prompt
    assert dialogue_to_messages("Q: sky?") == [user("Q: sky?")]  # no markers: one user turn
    assert dialogue_to_messages("Be brief.\n\nHuman: hi\n\nAssistant:") == [{"role": "system", "content": "Be brief."},
                                                                             user("hi")]


def test_hh_dialogue_to_messages_then_standard_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [DIALOGUE])
    result = convert(src, tmp_path / "m.jsonl", to="messages")
    assert (result.rows_read, result.converted, result.written, result.bad_records) == (1, 1, 1, 0)
    assert rows_of(tmp_path / "m.jsonl") == [{"prompt": [user("Hi there"), assistant("Hello!"), user("Sky colour?")],
                                              "chosen": [assistant("Blue.")], "rejected": [assistant("Go away.")]}]
    convert(tmp_path / "m.jsonl", tmp_path / "s.jsonl", to="standard")
    assert rows_of(tmp_path / "s.jsonl") == [{"prompt": DIALOGUE["chosen"].removesuffix(" Blue."),
                                              "chosen": " Blue.", "rejected": " Go away."}]


def test_hh_rlhf_to_messages_loads_the_same_pairs(hh_rlhf_path, tiny_tokenizer, tmp_path):
    out = tmp_path / "hh-messages.jsonl"
    result = convert(hh_rlhf_path, out, to="messages")
    assert (result.rows_read, result.converted, result.written, result.bad_records) == (2312, 2308, 2308, 4)
    assert result.bad_record_samples[0] == f"{hh_rlhf_path}:87: field 'chosen' is empty or whitespace only"
    first = rows_of(out)[0]
    assert first["prompt"][:3] == [user("what are some pranks with a pen i can do?"),
                                   assistant("Are you looking for practical joke ideas?"), user("yep")]
    examples, report = load_dataset(out, tiny_tokenizer)  # no --skip-bad-records needed any more
    assert (len(examples), report.bad_records, report.prompt_sources) == (2308, 0, {"explicit": 2308})


# ------------------------------------------------------------------------------- kto, sft, scores


def test_paired_to_kto_doubles_rows_with_alternating_labels(tmp_path, tiny_tokenizer):
    pairs = [{"prompt": f"Q{i}?", "chosen": " kind", "rejected": " rude"} for i in range(5)]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    result = convert(src, tmp_path / "kto.jsonl", to="kto")
    assert (result.converted, result.written) == (5, 10)
    rows = rows_of(tmp_path / "kto.jsonl")
    assert [r["label"] for r in rows] == [True, False] * 5
    assert rows[:2] == [{"prompt": "Q0?", "completion": " kind", "label": True},
                        {"prompt": "Q0?", "completion": " rude", "label": False}]
    examples, _ = load_dataset(tmp_path / "kto.jsonl", tiny_tokenizer, kind="unpaired")
    assert [ex.label for ex in examples] == [True, False] * 5


def test_sft_keeps_the_chosen_side(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [DIALOGUE, {"prompt": [user("sky?")], "chosen": [assistant("blue")],
                                                        "rejected": [assistant("black")]}])
    convert(src, tmp_path / "sft.jsonl", to="sft")
    assert rows_of(tmp_path / "sft.jsonl") == [
        {"prompt": DIALOGUE["chosen"].removesuffix(" Blue."), "completion": " Blue."},
        {"messages": [user("sky?"), assistant("blue")]}]


def test_ultrafeedback_scores_are_kept_and_ties_can_be_dropped(tmp_path):
    def row(prompt, good, bad, score_chosen, score_rejected):
        return {"prompt": prompt, "chosen": [user(prompt), assistant(good)], "rejected": [user(prompt), assistant(bad)],
                "messages": [user(prompt), assistant(good)], "score_chosen": score_chosen,
                "score_rejected": score_rejected}

    src = write_jsonl(tmp_path / "uf.jsonl", [row("sky?", "blue", "black", 8.0, 3.0),
                                              row("sea?", "wet", "dry", 5.0, 5.0)])
    kept = convert(src, tmp_path / "all.jsonl", to="standard")
    assert (kept.written, kept.equal_scores, kept.dropped) == (2, 1, {})
    assert rows_of(tmp_path / "all.jsonl")[0] == {"prompt": "\n\nHuman: sky?\n\nAssistant:", "chosen": " blue",
                                                  "rejected": " black", "score_chosen": 8.0, "score_rejected": 3.0}
    dropped = convert(src, tmp_path / "strict.parquet", to="messages", drop_equal_scores=True)
    assert (dropped.written, dropped.dropped) == (1, {"equal scores": 1})
    assert rows_of(tmp_path / "strict.parquet") == [{"prompt": [user("sky?")], "chosen": [assistant("blue")],
                                                     "rejected": [assistant("black")], "score_chosen": 8.0,
                                                     "score_rejected": 3.0}]


def test_bad_records_are_counted_and_the_rest_converted(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"prompt": "a", "chosen": " x", "rejected": " y"}\n{broken\n{"prompt": "b", "chosen": " x"}\n'
                   '{"prompt": "c", "chosen": " x", "rejected": " z"}\n')
    result = convert(src, tmp_path / "out.jsonl", to="standard")
    assert (result.rows_read, result.converted, result.bad_records) == (4, 2, 2)
    assert [s.split(": ")[0] for s in result.bad_record_samples] == [f"{src}:2", f"{src}:3"]
    assert run_cli(["data", "convert", str(src), str(tmp_path / "o.jsonl.gz"), "--to", "kto"]) == 0
    assert len(rows_of(tmp_path / "o.jsonl.gz")) == 4


def test_outputs_refused_or_never_half_written(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [DIALOGUE])
    with pytest.raises(ValueError, match="overwrite the input"):
        convert(src, src, to="standard")
    with pytest.raises(ValueError, match="must end in"):
        convert(src, tmp_path / "out.csv", to="standard")
    with pytest.raises(ValueError, match="unknown target"):
        convert(src, tmp_path / "out.jsonl", to="chatml")
    target = write_jsonl(tmp_path / "keep.jsonl", [{"old": 1}])

    def failing():
        yield {"new": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_rows(target, failing())
    assert rows_of(target) == [{"old": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl", "p.jsonl"]  # no temporary left behind


# ------------------------------------------------------------------------------- split


def prompt_groups_rows(n_prompts: int) -> list[dict]:
    """Pairs with 1-3 records per prompt; two prompts differ only in case and punctuation."""
    rows = []
    for i in range(n_prompts):
        for j in range(1 + i % 3):
            rows.append({"prompt": f"Question {i}?", "chosen": f" good {j}", "rejected": f" bad {j}"})
    rows.append({"prompt": "QUESTION 0!", "chosen": " other", "rejected": " worse"})  # same group as "Question 0?"
    return rows


def test_split_is_grouped_by_prompt_and_seeded(tmp_path):
    rows = prompt_groups_rows(40)  # 79 + 1 records
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = split(src, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", eval_fraction=0.2, seed=1)
    train, held_out = rows_of(tmp_path / "train.jsonl"), rows_of(tmp_path / "eval.jsonl")
    assert (result.rows_read, result.train_rows + result.eval_rows, result.bad_records) == (80, 80, 0)
    assert (len(train), len(held_out)) == (result.train_rows, result.eval_rows)
    assert result.eval_rows == 16  # round(0.2 * 80), filled exactly by whole groups
    assert not {prompt_key(r["prompt"]) for r in train} & {prompt_key(r["prompt"]) for r in held_out}
    assert sorted(map(json.dumps, train + held_out)) == sorted(map(json.dumps, rows))  # nothing lost or changed

    again = split(src, tmp_path / "t2.jsonl", tmp_path / "e2.jsonl", eval_fraction=0.2, seed=1)
    assert (tmp_path / "e2.jsonl").read_bytes() == (tmp_path / "eval.jsonl").read_bytes() and again == result
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    split(shuffled, tmp_path / "t3.jsonl", tmp_path / "e3.jsonl", eval_fraction=0.2, seed=1)
    assert sorted(map(json.dumps, rows_of(tmp_path / "e3.jsonl"))) == sorted(map(json.dumps, held_out))
    split(src, tmp_path / "t4.jsonl", tmp_path / "e4.jsonl", eval_fraction=0.2, seed=2)
    assert rows_of(tmp_path / "e4.jsonl") != held_out


def test_split_eval_size_and_bad_input(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", prompt_groups_rows(10))
    code = run_cli(["data", "split", str(src), "--train", str(tmp_path / "tr.parquet"), "--eval",
                    str(tmp_path / "ev.jsonl"), "--eval-size", "5", "--seed", "3"])
    assert code == 0 and "no prompt on both sides" in capsys.readouterr().out
    assert len(rows_of(tmp_path / "ev.jsonl")) == 5 and len(rows_of(tmp_path / "tr.parquet")) == 15
    with pytest.raises(ValueError, match="not both"):
        split(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", eval_fraction=0.1, eval_size=3)
    with pytest.raises(ValueError, match="leaves no training data"):
        split(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", eval_size=20)
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " b"}] * 3)
    with pytest.raises(ValueError, match="at least two"):
        split(one_prompt, tmp_path / "a.jsonl", tmp_path / "b.jsonl")


def test_normalize_text():
    assert normalize_text("  Hello,   World!\n") == "hello world"
    assert normalize_text("¿Qué tal?") == "qué tal"


def test_ultrafeedback_binarized_rows_read_as_pairs_unpaired_and_sft(tmp_path, tiny_tokenizer):
    """UltraFeedback-binarized rows carry prompt, chosen, rejected *and* messages (the chosen
    conversation): read as unpaired (KTO) they give chosen/True then rejected/False; as sft, the
    messages."""
    row = {"prompt": "Sky colour?", "chosen": [user("Sky colour?"), assistant("Blue.")],
           "rejected": [user("Sky colour?"), assistant("Green.")],
           "messages": [user("Sky colour?"), assistant("Blue.")], "score_chosen": 8.0, "score_rejected": 2.0}
    path = write_jsonl(tmp_path / "uf.jsonl", [row, row])
    decode = tiny_tokenizer.decode
    pairs, _ = load_dataset(path, tiny_tokenizer, kind="pair")
    assert len(pairs) == 2 and "Green" in decode(pairs[0].completions[1])
    unpaired, _ = load_dataset(path, tiny_tokenizer, kind="unpaired")
    assert [e.label for e in unpaired] == [True, False, True, False]
    assert "Blue" in decode(unpaired[0].completions[0]) and "Green" in decode(unpaired[1].completions[0])
    sft, _ = load_dataset(path, tiny_tokenizer, kind="sft")
    assert len(sft) == 2 and "Blue" in decode(sft[0].completions[0])


# ------------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("failure", ["unwritable", "full"])
@pytest.mark.parametrize("command", ["convert", "split"])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_an_unwritable_folder_or_a_full_disk_is_one_line_naming_the_output(tmp_path, capsys, failure, command,
                                                                          suffix):
    """Issue 33, finding 5: ``data convert`` and ``data split`` into a read-only folder or onto a full
    disk gave a PermissionError / OSError traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", prompt_groups_rows(6))
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / f"train{suffix}"
    argv = (["data", "convert", str(src), str(target), "--to", "standard"] if command == "convert" else
            ["data", "split", str(src), "--train", str(target), "--eval", str(folder / f"eval{suffix}")])
    with deny_writes(folder) if failure == "unwritable" else fill_disk(folder):
        assert main(argv) == 1
    line = one_error_line(capsys, target)
    assert line.endswith(f"cannot write {target}: permission denied") if failure == "unwritable" else \
        line.startswith(f"preftune: error: no space left on device writing {target} (")
    assert list(folder.iterdir()) == []


def test_a_folder_that_cannot_be_made_and_a_parquet_that_cannot_be_written_are_one_line(tmp_path, capsys,
                                                                                       monkeypatch):
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "in.jsonl", [DIALOGUE])
    with deny_writes(tmp_path):
        target = tmp_path / "new" / "out.jsonl"
        assert main(["data", "convert", str(src), str(target), "--to", "standard"]) == 1
    assert one_error_line(capsys, target).endswith(f"cannot write {target}: permission denied")

    def refused(table, where, *args, **kwargs):  # pyarrow's own wording: an OSError without a file name
        raise OSError(13, f"Failed to open local file '{where}'. Detail: [errno 13] Permission denied")

    monkeypatch.setattr(pq, "write_table", refused)
    target = tmp_path / "out.parquet"
    assert main(["data", "convert", str(src), str(target), "--to", "standard"]) == 1
    assert one_error_line(capsys, target).endswith(f"cannot write {target}: permission denied")
    assert not target.exists()


def test_a_conversion_with_no_row_leaves_no_file(tmp_path, capsys):
    """Exit 1 with nothing converted writes nothing: no empty file, and an earlier output stays."""
    src = write_jsonl(tmp_path / "in.jsonl", ['{"broken"'])
    target = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(target), "--to", "standard"]) == 1
    assert not target.exists()
    target.write_text('{"old": 1}\n')
    assert main(["data", "convert", str(src), str(target), "--to", "standard"]) == 1
    assert target.read_text() == '{"old": 1}\n'


def test_outputs_get_the_mode_open_gives_them(tmp_path):
    """Issue 33, finding 6: 0666 less the umask for a new file, an existing file's own mode kept."""
    src = write_jsonl(tmp_path / "in.jsonl", [DIALOGUE])
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "new.jsonl", to="standard")
        existing = write_jsonl(tmp_path / "existing.jsonl.gz", [])
        existing.chmod(0o600)
        convert(src, existing, to="messages")
    finally:
        os.umask(old)
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644
    assert existing.stat().st_mode & 0o777 == 0o600 and len(rows_of(existing)) == 1


def test_a_split_whose_eval_file_cannot_be_written_writes_neither(tmp_path, capsys):
    """Both outputs or neither: the disk filling up under the eval file leaves no train file (and an
    earlier one as it was); the line names the eval file, the one that failed."""
    src = write_jsonl(tmp_path / "in.jsonl", prompt_groups_rows(6))
    folder = tmp_path / "out"
    folder.mkdir()
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    argv = ["data", "split", str(src), "--train", str(train), "--eval", str(held_out)]
    with fill_disk(folder, only="eval"):
        assert main(argv) == 1
    assert one_error_line(capsys, held_out).startswith(f"preftune: error: no space left on device writing {held_out}")
    assert list(folder.iterdir()) == []
    train.write_text('{"old": 1}\n')
    with fill_disk(folder, only="eval"):
        assert main(argv) == 1
    assert [p.name for p in folder.iterdir()] == ["train.jsonl"] and train.read_text() == '{"old": 1}\n'
    one_error_line(capsys, held_out)
    with fill_disk(folder, only="train"):
        assert main(argv) == 1
    assert one_error_line(capsys, train).startswith(f"preftune: error: no space left on device writing {train} (")


# ------------------------------------------------------------------------------- response groups


GROUPS = [{"prompt": "Name a colour.", "responses": ["blue", "black", "a colour"], "scores": [4, 1, 2.5]},
          {"prompt": [user("Name a fruit.")], "responses": ["apple", [assistant("pear")]], "ranks": [2, 1]},
          {"instruction": "Say hi.", "completions": [{"response": "hi", "overall_score": 5},
                                                     {"response": "go", "fine-grained_score": 2}]}]


def test_groups_convert_to_messages_and_standard_and_read_back_as_the_same_groups(tmp_path, tiny_tokenizer):
    """A group's prompt and each response are converted, its scores kept (ranks as the scores they read as);
    the output reads as groups with the input's scores, and messages -> standard -> messages is stable."""
    src = write_jsonl(tmp_path / "groups.jsonl", GROUPS)
    result = convert(src, tmp_path / "m.jsonl", to="messages")
    assert (result.rows_read, result.converted, result.written, result.bad_records) == (3, 3, 3, 0)
    assert rows_of(tmp_path / "m.jsonl") == [
        {"prompt": [user("Name a colour.")], "responses": [[assistant("blue")], [assistant("black")],
                                                          [assistant("a colour")]], "scores": [4.0, 1.0, 2.5]},
        {"prompt": [user("Name a fruit.")], "responses": [[assistant("apple")], [assistant("pear")]],
         "scores": [0.0, 1.0]},
        {"prompt": [user("Say hi.")], "responses": [[assistant("hi")], [assistant("go")]], "scores": [5.0, 2.0]}]
    convert(tmp_path / "m.jsonl", tmp_path / "s.jsonl", to="standard")
    standard = rows_of(tmp_path / "s.jsonl")
    assert standard[1] == {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "responses": [" apple", " pear"],
                           "scores": [0.0, 1.0]}
    convert(tmp_path / "s.jsonl", tmp_path / "m2.jsonl", to="messages")
    assert rows_of(tmp_path / "m2.jsonl") == rows_of(tmp_path / "m.jsonl")
    for path in (src, tmp_path / "m.jsonl", tmp_path / "s.jsonl"):
        examples, report = load_dataset(path, tiny_tokenizer, "group")
        assert report.bad_records == 0
        assert [ex.scores for ex in examples] == [[4.0, 1.0, 2.5], [0.0, 1.0], [5.0, 2.0]]


def test_groups_to_sft_keep_the_best_response_and_to_kto_are_bad_records(tmp_path, capsys):
    src = write_jsonl(tmp_path / "groups.jsonl", GROUPS)
    convert(src, tmp_path / "sft.jsonl", to="sft")
    assert rows_of(tmp_path / "sft.jsonl") == [{"prompt": "Name a colour.", "completion": "blue"},
                                               {"messages": [user("Name a fruit."), assistant("pear")]},
                                               {"prompt": "Say hi.", "completion": "hi"}]
    assert run_cli(["data", "convert", str(src), str(tmp_path / "kto.jsonl"), "--to", "kto"]) == 1
    printed = capsys.readouterr().out
    assert f"first bad: {src}:1: a response group has no desirable / undesirable label" in printed
    assert not (tmp_path / "kto.jsonl").exists()


def test_bad_groups_are_counted_with_file_and_line_and_the_rest_converted(tmp_path):
    """k < 2, a scores list of the wrong length and a non-numeric score: one line each naming file:line."""
    src = write_jsonl(tmp_path / "groups.jsonl", [
        GROUPS[0],
        {"prompt": "q", "responses": ["only"], "scores": [1]},
        {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2]},
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, "high"]},
        GROUPS[2]])
    result = convert(src, tmp_path / "out.jsonl", to="messages")
    assert (result.rows_read, result.converted, result.bad_records) == (5, 2, 3)
    assert result.bad_record_samples == [
        f"{src}:2: field 'responses' holds 1 response(s); a group needs at least 2",
        f"{src}:3: field 'scores' has 2 value(s) for 3 responses",
        f"{src}:4: field 'scores[1]' must be a finite number, got 'high'"]
