"""Rows -> Example: every accepted shape, implicit prompts cut at turn boundaries, bad records named."""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data.errors import DataError
from preftune.data.formats import ASSISTANT_MARKER, chosen_as_sft, pairs_to_unpaired, split_dialogue, to_example
from preftune.data.readers import read_rows
from preftune.data.records import Example, Location
from preftune.recipes.real_config import DEFAULT_HH_DATA

LOC = Location("pairs.jsonl", line=3)
HH_FILE = DEFAULT_HH_DATA  # Anthropic HH-RLHF harmless test pairs, shipped with the package


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------ pairs


def test_standard_pair():
    ex = to_example({"prompt": "Q: sky?", "chosen": " blue", "rejected": " black", "extra": 1}, LOC, "pair")
    assert ex == Example(kind="pair", prompt="Q: sky?", chosen=" blue", rejected=" black", location=LOC,
                         prompt_source="explicit")


def test_conversational_pair_with_prompt():
    row = {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("black")]}
    ex = to_example(row, LOC, "pair")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.prompt_source) == (
        [user("sky?")], [assistant("blue")], [assistant("black")], "explicit")


def test_conversational_pair_whose_completions_repeat_the_prompt():
    row = {"prompt": [user("sky?")], "chosen": [user("sky?"), assistant("blue")],
           "rejected": [user("sky?"), assistant("black")]}
    ex = to_example(row, LOC, "pair")
    assert (ex.prompt, ex.chosen, ex.rejected) == ([user("sky?")], [assistant("blue")], [assistant("black")])


def test_string_prompt_with_full_conversations_ultrafeedback_style():
    row = {"prompt": "sky?", "chosen": [user("sky?"), assistant("blue")],
           "rejected": [user("sky?"), assistant("black")]}
    ex = to_example(row, LOC, "pair")
    assert (ex.prompt, ex.chosen, ex.rejected) == ([user("sky?")], [assistant("blue")], [assistant("black")])


def test_message_prompt_with_string_completions():
    ex = to_example({"prompt": [user("sky?")], "chosen": "blue", "rejected": "black"}, LOC, "pair")
    assert (ex.chosen, ex.rejected) == ([assistant("blue")], [assistant("black")])


def test_implicit_prompt_blue_black_cuts_at_the_turn_not_at_bl():
    """The character-level common prefix is '...Assistant: bl'; the prompt must end at the turn."""
    row = {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: blue",
           "rejected": "\n\nHuman: Name a colour.\n\nAssistant: black"}
    ex = to_example(row, LOC, "pair")
    assert ex.prompt == "\n\nHuman: Name a colour.\n\nAssistant:"
    assert (ex.chosen, ex.rejected, ex.prompt_source) == (" blue", " black", "implicit")


def test_implicit_prompt_takes_the_last_common_assistant_turn():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: colour?\n\nAssistant:"
    ex = to_example({"chosen": shared + " blue", "rejected": shared + " black, or\n\nAssistant: more"}, LOC, "pair")
    assert (ex.prompt, ex.chosen, ex.rejected) == (shared, " blue", " black, or\n\nAssistant: more")


def test_implicit_prompt_without_a_turn_boundary_is_an_error():
    with pytest.raises(DataError) as err:
        to_example({"chosen": "Q: colour? A: blue", "rejected": "Q: colour? A: black"}, LOC, "pair")
    assert str(err.value) == ("pairs.jsonl:3: no 'prompt' field, and 'chosen' and 'rejected' share no "
                              "'\\n\\nAssistant:' turn to split the prompt at; add a 'prompt' field")


def test_implicit_prompt_from_messages_at_the_last_common_message():
    shared = [user("hi"), assistant("hello"), user("colour?")]
    ex = to_example({"chosen": shared + [assistant("blue")], "rejected": shared + [assistant("black")]}, LOC, "pair")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.prompt_source) == (
        shared, [assistant("blue")], [assistant("black")], "implicit")


def test_implicit_messages_completion_must_be_assistant():
    with pytest.raises(DataError) as err:
        to_example({"chosen": [user("a"), user("b")], "rejected": [user("a"), assistant("c")]}, LOC, "pair")
    assert str(err.value) == "pairs.jsonl:3: field 'chosen': completion message 1 must have role 'assistant', got 'user'"
    with pytest.raises(DataError, match="share no leading message"):
        to_example({"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("b")]}, LOC, "pair")


# ------------------------------------------------------------------------------------ unpaired, sft


@pytest.mark.parametrize("label, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_unpaired_labels(label, expected):
    ex = to_example({"prompt": "Q", "completion": " A", "label": label}, LOC, "unpaired")
    assert ex == Example(kind="unpaired", prompt="Q", completion=" A", label=expected, location=LOC)


@pytest.mark.parametrize("label", [2, "true", 1.0, None])
def test_unpaired_bad_labels(label):
    with pytest.raises(DataError) as err:
        to_example({"prompt": "Q", "completion": " A", "label": label}, LOC, "unpaired")
    expected = "field 'label' is missing" if label is None else f"field 'label' must be true/false (or 0/1), got {label!r}"
    assert str(err.value) == f"pairs.jsonl:3: {expected}"


def test_unpaired_messages():
    ex = to_example({"prompt": [user("Q")], "completion": [assistant("A")], "label": False}, LOC, "unpaired")
    assert (ex.prompt, ex.completion, ex.label) == ([user("Q")], [assistant("A")], False)


def test_sft_prompt_completion_and_messages():
    ex = to_example({"prompt": "Q", "completion": " A"}, LOC, "sft")
    assert ex == Example(kind="sft", prompt="Q", completion=" A", location=LOC)
    messages = [user("hi"), assistant("hello"), user("colour?"), assistant("blue")]
    ex = to_example({"messages": messages}, LOC, "sft")
    assert (ex.prompt, ex.completion, ex.prompt_source) == (messages[:3], [assistant("blue")], "messages")


def test_sft_messages_must_end_with_the_assistant():
    with pytest.raises(DataError) as err:
        to_example({"messages": [user("hi"), assistant("x"), user("more")]}, LOC, "sft")
    assert str(err.value) == ("pairs.jsonl:3: field 'messages': the last message must be the assistant's "
                              "(the completion), got role 'user'")


def test_pairs_to_unpaired_and_chosen_as_sft():
    pair = to_example({"prompt": "Q", "chosen": " good", "rejected": " bad"}, LOC, "pair")
    assert pairs_to_unpaired([pair, pair]) == [
        Example(kind="unpaired", prompt="Q", completion=" good", label=True, location=LOC),
        Example(kind="unpaired", prompt="Q", completion=" bad", label=False, location=LOC),
    ] * 2
    assert chosen_as_sft([pair]) == [Example(kind="sft", prompt="Q", completion=" good", location=LOC)]
    with pytest.raises(ValueError, match="takes pair examples"):
        chosen_as_sft(pairs_to_unpaired([pair]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown data kind 'dpo'"):
        to_example({}, LOC, "dpo")


# ------------------------------------------------------------------------------- bad records, by file


BAD_RECORDS = [
    ({"prompt": "Q", "rejected": " no"}, "pair", "field 'chosen' is missing"),
    ({"prompt": "Q", "chosen": 5, "rejected": " no"}, "pair", "field 'chosen' must be a string or a list of messages, got int"),
    ({"prompt": 5, "chosen": " yes", "rejected": " no"}, "pair", "field 'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "Q", "chosen": "  \n", "rejected": " no"}, "pair", "field 'chosen' is empty or whitespace only"),
    ({"prompt": "Q", "chosen": " same", "rejected": " same"}, "pair", "'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "chosen": "x", "rejected": [assistant("y")]}, "pair",
     "'chosen' and 'rejected' must both be strings or both lists of messages"),
    ({"prompt": [{"content": "Q"}], "chosen": "a", "rejected": "b"}, "pair", "field 'prompt' message 1: 'role' is missing"),
    ({"prompt": [user("Q")], "chosen": [{"role": "assistant"}], "rejected": "b"}, "pair",
     "field 'chosen' message 1: 'content' is missing"),
    ({"prompt": [user("Q")], "chosen": [assistant(3)], "rejected": "b"}, "pair",
     "field 'chosen' message 1: 'content' must be a string, got int"),
    ({"prompt": [user("Q")], "chosen": ["hi"], "rejected": "b"}, "pair",
     "field 'chosen' message 1: expected an object with 'role' and 'content', got str"),
    ({"prompt": "Q", "completion": "", "label": True}, "unpaired", "field 'completion' is empty or whitespace only"),
    ({"prompt": "Q"}, "sft", "field 'completion' is missing (an SFT record needs 'prompt' and 'completion', or 'messages')"),
    ({"messages": []}, "sft", "field 'messages' is an empty list of messages"),
    ({"prompt": "Q", "completion": "ab\ud800"}, "sft", "field 'completion' holds an unpaired surrogate '\\ud800' "
     "(at character 3)"),
]


@pytest.mark.parametrize("row, kind, message", BAD_RECORDS)
def test_bad_record_message_names_file_line_and_field(tmp_path, row, kind, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": " a", "rejected": " b", "completion": " c", "label": 1})
                    + "\n" + json.dumps(row) + "\n")
    rows = list(read_rows(str(path)))
    to_example(rows[0][1], rows[0][0], kind)  # the first line is fine
    with pytest.raises(DataError) as err:
        to_example(rows[1][1], rows[1][0], kind)
    assert str(err.value) == f"{path}:2: {message}"


# -------------------------------------------------------------------------------- HH-RLHF, real data

# Lines whose chosen reply is empty (HH-harmless prefers saying nothing there): bad records.
HH_EMPTY_CHOSEN_LINES = [87, 517, 926, 1104]
# Lines where one reply itself contains a later "\n\nAssistant:" the other side does not share
# (multi-turn replies in the source data); the cut is still at the last *common* turn.
HH_REPLY_WITH_INNER_TURN_LINES = [1255, 1689, 1951, 1953, 2037]


def test_hh_rlhf_prompts_end_at_the_last_common_assistant_turn():
    rows = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")]
    assert len(rows) == 2312
    inner_turns = []
    for line, row in enumerate(rows, 1):
        prompt, chosen, rejected = split_dialogue(row["chosen"], row["rejected"], Location("hh", line=line))
        assert prompt.endswith(ASSISTANT_MARKER)
        assert row["chosen"] == prompt + chosen and row["rejected"] == prompt + rejected
        assert "\n\nHuman:" not in chosen and "\n\nHuman:" not in rejected
        # no later turn boundary is shared: this is the last common one
        assert ASSISTANT_MARKER not in os.path.commonprefix([chosen, rejected])
        if ASSISTANT_MARKER in chosen or ASSISTANT_MARKER in rejected:
            inner_turns.append(line)
    assert inner_turns == HH_REPLY_WITH_INNER_TURN_LINES

    bad_lines = []
    for line, row in enumerate(rows, 1):
        try:
            ex = to_example(row, Location(str(HH_FILE), line=line), "pair")
        except DataError as err:
            assert str(err) == f"{HH_FILE}:{line}: field 'chosen' is empty or whitespace only"
            bad_lines.append(line)
            continue
        assert ex.prompt_source == "implicit" and ex.prompt.endswith(ASSISTANT_MARKER)
    assert bad_lines == HH_EMPTY_CHOSEN_LINES


# ---------------------------------------------------------------------- property: only DataError


TEXT = st.sampled_from(["", " ", "Q", " blue", " black", "x\ud800", "\n\nHuman: hi\n\nAssistant: a",
                        "\n\nHuman: hi\n\nAssistant: b"])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", ""]),
                                 "content": st.sampled_from(["", "hi", " there"])})
MESSAGES = st.lists(MESSAGE | st.sampled_from([{}, {"role": "user"}, "hi", {"role": 1, "content": "x"}]), max_size=3)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=3), max_leaves=6)
FIELD = st.one_of(TEXT, TEXT, MESSAGES, JSON_VALUES)
# Mostly near-valid records, so conversion gets past the first check.
RECORD = st.fixed_dictionaries({}, optional={
    "prompt": FIELD, "chosen": FIELD, "rejected": FIELD, "completion": FIELD, "messages": MESSAGES,
    "label": st.booleans() | st.integers(-1, 2) | st.none() | TEXT,
})
FILE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(RECORD, max_size=4).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    st.tuples(st.lists(RECORD, min_size=1, max_size=3), st.binary(max_size=8)).map(
        lambda t: "\n".join(json.dumps(r) for r in t[0]).encode() + t[1]),
)


@settings(max_examples=100, deadline=None)
@given(FILE_BYTES)
def test_arbitrary_jsonl_bytes_give_records_or_data_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_bytes(data)
        for kind in ("pair", "unpaired", "sft", "group"):
            try:
                for location, row in read_rows(str(path)):
                    assert isinstance(to_example(row, location, kind), Example)
            except DataError as err:
                assert str(err).startswith(str(path))


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q", "chosen": " A", "rejected": " A"}, "identical"),
    ({"prompt": "Q", "chosen": " ", "rejected": " B"}, "empty"),
    ({"chosen": "no turns here", "rejected": "none here either"}, "prompt_split"),
    ({"prompt": "Q", "chosen": 3, "rejected": " B"}, "malformed"),
    ({"prompt": "Q", "rejected": " B"}, "malformed"),
])
def test_data_errors_carry_a_reason_the_doctor_counts_by(row, reason):
    with pytest.raises(DataError) as err:
        to_example(row, LOC, "pair")
    assert err.value.reason == reason
    import copy

    assert copy.copy(err.value).reason == reason  # __reduce__ keeps it (also what pickling across processes uses)


# ------------------------------------------------------------------------------------------ groups


def test_group_record_with_scores_ranks_and_messages():
    ex = to_example({"prompt": "Q", "responses": [" a", " b", " c"], "scores": [1, 2.5, 2.5]}, LOC, "group")
    assert ex == Example(kind="group", prompt="Q", responses=[" a", " b", " c"], scores=[1.0, 2.5, 2.5],
                         location=LOC)
    assert ex.completion_texts == [" a", " b", " c"]
    # ranks: lower is better; stored as scores max(ranks) - rank (ties stay ties)
    assert to_example({"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 4]},
                      LOC, "group").scores == [2.0, 3.0, 2.0, 0.0]
    row = {"prompt": [user("sky?")], "responses": ["blue", [user("sky?"), assistant("black")]], "scores": [1, 0]}
    ex = to_example(row, LOC, "group")
    assert (ex.prompt, ex.responses) == ([user("sky?")], [[assistant("blue")], [assistant("black")]])


def test_ultrafeedback_raw_row_is_a_group():
    """openbmb/UltraFeedback's raw shape: ``instruction``, ``completions[].response`` with ``overall_score``
    (else ``fine-grained_score``, else the mean numeric annotation Rating; "N/A" left out)."""
    row = {"source": "evol_instruct", "instruction": "Name a colour.", "models": ["m1", "m2", "m3", "m4"],
           "completions": [
               {"model": "m1", "response": "blue", "overall_score": 7.5, "fine-grained_score": 4.25},
               {"model": "m2", "response": "black", "fine-grained_score": 2.0},
               {"model": "m3", "response": "green", "annotations": {
                   "helpfulness": {"Rating": "4", "Rationale": "ok"}, "honesty": {"Rating": "N/A"},
                   "instruction_following": {"Rating": "5"}, "truthfulness": {"Rating": "3", "Type": ["0"]}}},
               {"model": "m4", "response": "red", "overall_score": 1}]}
    ex = to_example(row, LOC, "group")
    assert (ex.prompt, ex.responses, ex.scores) == ("Name a colour.", ["blue", "black", "green", "red"],
                                                    [7.5, 2.0, 4.0, 1.0])
    assert to_example({"prompt": "Q", "completions": row["completions"][:2]}, LOC, "group").prompt == "Q"


def test_group_row_read_for_a_pair_method_is_a_group():
    """Pair losses train on groups through their ordered pairs: a group row read as "pair" stays a group."""
    row = {"prompt": "Q", "responses": [" a", " b", " c"], "scores": [1, 0, 2]}
    assert to_example(row, LOC, "pair") == to_example(row, LOC, "group")
    uf = {"instruction": "Q", "completions": [{"response": "a", "overall_score": 2}, {"response": "b",
                                                                                      "overall_score": 1}]}
    assert to_example(uf, LOC, "pair").scores == [2.0, 1.0]
    with pytest.raises(DataError, match="field 'chosen' is missing"):
        to_example({"prompt": "Q", "rejected": " b", "responses": [" a"]}, LOC, "pair")  # chosen/rejected: a pair


def test_pair_row_read_as_a_group_of_two():
    ex = to_example({"prompt": "Q: sky?", "chosen": " blue", "rejected": " black"}, LOC, "group")
    assert (ex.kind, ex.prompt, ex.responses, ex.scores) == ("group", "Q: sky?", [" blue", " black"], [1.0, 0.0])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "responses": [" a"], "scores": [1]},
     "field 'responses' holds 1 response(s); a group needs at least 2"),
    ({"prompt": "Q", "responses": [" a", " b", " c"], "scores": [1, 2]},
     "field 'scores' has 2 value(s) for 3 responses"),
    ({"prompt": "Q", "responses": [" a", " b"], "ranks": [1, 2, 3]}, "field 'ranks' has 3 value(s) for 2 responses"),
    ({"prompt": "Q", "responses": [" a", " b"], "scores": [1, "high"]},
     "field 'scores[1]' must be a finite number, got 'high'"),
    ({"prompt": "Q", "responses": [" a", " b"], "scores": [float("nan"), 1]},
     "field 'scores[0]' must be a finite number, got nan"),
    ({"prompt": "Q", "responses": [" a", " b"], "scores": [True, 1]},
     "field 'scores[0]' must be a finite number, got True"),
    ({"prompt": "Q", "responses": [" a", " b"], "scores": "1 2"}, "field 'scores' must be a list of numbers, got str"),
    ({"prompt": "Q", "responses": [" a", " b"]}, "the group has no 'scores' or 'ranks' (one number per response)"),
    ({"prompt": "Q", "responses": [" a", " b"], "scores": [1, 2], "ranks": [1, 2]},
     "the group has both 'scores' and 'ranks'; give one"),
    ({"prompt": "Q", "responses": " a", "scores": [1]}, "field 'responses' must be a list of responses, got str"),
    ({"prompt": "Q", "responses": [" a", 3], "scores": [1, 2]},
     "field 'responses[1]' must be a string or a list of messages, got int"),
    ({"prompt": "Q", "responses": [" a", "  "], "scores": [1, 2]}, "field 'responses[1]' is empty or whitespace only"),
    ({"responses": [" a", " b"], "scores": [1, 2]}, "field 'prompt' is missing"),
    ({"prompt": "Q"}, "field 'responses' is missing"),
    ({"instruction": "Q", "completions": [{"response": "a", "overall_score": 1}]},
     "field 'completions' holds 1 completion(s); a group needs at least 2"),
    ({"instruction": "Q", "completions": [{"response": "a", "overall_score": "x"}, {"response": "b"}]},
     "field 'completions[0].overall_score' must be a finite number, got 'x'"),
    ({"instruction": "Q", "completions": [{"response": "a", "overall_score": 1}, {"response": "b"}]},
     "field 'completions[1]' has no score"),
    ({"instruction": "Q", "completions": [{"overall_score": 1}, {"response": "b", "overall_score": 2}]},
     "field 'completions[0].response' is missing"),
])
def test_bad_groups_are_one_line_naming_the_place_and_field(row, message):
    with pytest.raises(DataError) as err:
        to_example(row, LOC, "group")
    text = str(err.value)
    assert text.startswith("pairs.jsonl:3: ") and "\n" not in text
    assert message in text


@pytest.mark.parametrize("margin, shown", [(10**400, "1" + "0" * 59), (-(10**400), "-1" + "0" * 58),
                                           (float("inf"), "inf"), (float("nan"), "nan"), ("2", "'2'"),
                                           (True, "True")])
def test_a_bad_pair_margin_is_one_line_naming_the_place_and_field(margin, shown):
    """A margin beyond float range (an integer like 10**400) raised OverflowError; now the same one line as
    any bad field: file:line, the field, and the value (cut to 60 characters)."""
    row = {"prompt": "Q", "chosen": " a", "rejected": " b", "margin": margin}
    with pytest.raises(DataError) as err:
        to_example(row, LOC, "pair")
    text = str(err.value)
    assert text == f"pairs.jsonl:3: field 'margin' must be a finite number, got {shown}"


def test_data_check_reports_a_huge_margin_as_a_bad_record(tmp_path, capsys):
    """``data check`` on a file whose margin is 10**400: the bad record's line names file:line and the field
    (it stopped with an OverflowError traceback)."""
    from preftune.cli.main import main

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n"
                    + '{"prompt": "Q", "chosen": " a", "rejected": " b", "margin": 1' + "0" * 400 + "}\n")
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: field 'margin' must be a finite number, got 1{'0' * 59}\n" in out


def test_bad_group_in_a_file_names_file_and_line(tmp_path):
    from preftune.data.load import load_dataset
    from preftune.model.tiny import train_tokenizer

    path = tmp_path / "groups.jsonl"
    good = {"prompt": "Q: sky?", "responses": [" blue", " black", " red"], "scores": [2, 0, 1]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "scores": [2, 0]}) + "\n")
    with pytest.raises(DataError, match=r"groups\.jsonl:2: field 'scores' has 2 value\(s\) for 3 responses"):
        load_dataset(str(path), train_tokenizer(), kind="group")
    examples, report = load_dataset(str(path), train_tokenizer(), kind="group", skip_bad_records=True)
    assert len(examples) == 1 and report.bad_records == 1
    assert examples[0].scores == [2.0, 0.0, 1.0] and len(examples[0].completions) == 3


SCORE = st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none() | TEXT \
    | st.just(10 ** 400)
UF_COMPLETION = st.fixed_dictionaries({}, optional={
    "response": FIELD, "overall_score": SCORE, "fine-grained_score": SCORE,
    "annotations": st.dictionaries(st.sampled_from(["helpfulness", "honesty"]),
                                   st.fixed_dictionaries({}, optional={"Rating": SCORE}) | JSON_VALUES, max_size=2),
}) | JSON_VALUES
GROUP_RECORD = st.fixed_dictionaries({}, optional={
    "prompt": FIELD, "instruction": FIELD, "responses": st.lists(FIELD, max_size=4) | FIELD,
    "scores": st.lists(SCORE, max_size=4) | SCORE, "ranks": st.lists(SCORE, max_size=4),
    "completions": st.lists(UF_COMPLETION, max_size=4), "chosen": FIELD, "rejected": FIELD,
})


@settings(max_examples=300, deadline=None)
@given(GROUP_RECORD)
def test_arbitrary_group_rows_give_a_group_or_one_data_error_line(row):
    try:
        ex = to_example(row, LOC, "group")
    except DataError as err:
        assert str(err).startswith("pairs.jsonl:3: ") and "\n" not in str(err)
        return
    assert ex.kind == "group" and len(ex.responses) == len(ex.scores) >= 2
    assert all(isinstance(s, float) and math.isfinite(s) for s in ex.scores)
