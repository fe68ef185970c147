"""Tokenization with the real byte-level BPE of ``preftune.model.tiny``: boundary-exact ids, one BOS,
EOS on text, template mismatches counted, truncation, and ``load_dataset`` end to end.

Token ids used below (``train_tokenizer()``, BOS ``<s>`` = 1, EOS ``</s>`` = 2):
"One two three four five six seven eight nine ten." -> 333 404 451 424 455 415 453 395 429 403 18
" A cat sat on the mat."                            -> 268 421 413 410 278 400 18
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from preftune.data import DataError, load_dataset, tokenize_example
from preftune.data.records import Example, Location
from preftune.data.report import DataReport
from preftune.data.tokenize import special_prefix_ids
from preftune.model.tiny import CHAT_TEMPLATE, train_tokenizer
from preftune.recipes.real_config import DEFAULT_HH_DATA

BOS, EOS = 1, 2
HH_FILE = DEFAULT_HH_DATA  # Anthropic HH-RLHF harmless test pairs, shipped with the package
COUNTING = "One two three four five six seven eight nine ten."
COUNTING_IDS = [333, 404, 451, 424, 455, 415, 453, 395, 429, 403, 18]
CAT_IDS = [268, 421, 413, 410, 278, 400, 18]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]  # with the tokenizer's own BOS


def decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=False)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -------------------------------------------------------------------------------- boundary, BOS, EOS


def test_special_prefix_ids():
    assert special_prefix_ids(train_tokenizer()) == [BOS]
    assert special_prefix_ids(train_tokenizer(bos=False)) == []


def test_text_pair_is_boundary_exact_with_one_bos_and_eos(tok):
    prompt = "Human: Name a colour. Assistant:"
    ex = Example(kind="pair", prompt=prompt, chosen=" blue.", rejected=" black.")
    out = tokenize_example(tok, ex, index=7)
    assert out.index == 7 and out.truncated is False
    assert out.prompt_ids == ids(tok, prompt)
    for completion, text in zip(out.completions, (" blue.", " black.")):
        assert out.prompt_ids + completion == ids(tok, prompt + text) + [EOS]
        assert (out.prompt_ids + completion).count(BOS) == 1 and out.prompt_ids[0] == BOS
        assert completion[-1] == EOS
    assert decode(tok, out.completions[0]) == " blue.</s>"


@pytest.mark.parametrize("prompt, completion, first_token, merged", [
    ("Human: Name a colour. Assistant: ", "blue.", " blue", 1),  # prompt ends in the completion's space
    ("A cat sat on the m", "at.", " mat", 2),  # a word split across the boundary: " " "m" -> " mat"
])
def test_bpe_merge_across_the_boundary_goes_to_the_completion(tok, prompt, completion, first_token, merged):
    report = DataReport(source="t", kind="sft")
    out = tokenize_example(tok, Example(kind="sft", prompt=prompt, completion=completion), 0, report=report)
    full = ids(tok, prompt + completion)
    assert out.prompt_ids + out.completions[0] == full + [EOS]  # completion = tail of the full ids
    assert out.prompt_ids == ids(tok, prompt)[:-merged]  # the prompt's last token(s) merged away
    assert decode(tok, out.completions[0][:1]) == first_token
    assert report.boundary_merges == 1


def test_completion_already_ending_in_eos_gets_no_second(tok):
    out = tokenize_example(tok, Example(kind="sft", prompt="Q:", completion=" A cat sat on the mat.</s>"), 0)
    assert out.completions == [CAT_IDS + [EOS]]


def test_chat_pair_is_boundary_exact_one_bos_template_end_of_turn(tok):
    ex = Example(kind="pair", prompt=[user("Name a colour.")], chosen=[assistant("blue")],
                 rejected=[assistant("black")])
    out = tokenize_example(tok, ex, 0)
    rendered_prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_ids == ids(tok, rendered_prompt)
    for completion, reply in zip(out.completions, ("blue", "black")):
        full = tok.apply_chat_template([user("Name a colour."), assistant(reply)], tokenize=False)
        assert out.prompt_ids + completion == ids(tok, full)
        assert (out.prompt_ids + completion).count(BOS) == 1
        assert EOS not in completion  # the template's <|im_end|> ends the turn; no EOS added
    assert decode(tok, out.completions[0]) == "blue<|im_end|>\n"


def test_template_or_text_already_starting_with_bos_gets_no_second(tok):
    bos_tok = train_tokenizer()
    bos_tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    out = tokenize_example(bos_tok, Example(kind="sft", prompt=[user("hi")], completion=[assistant("yo")]), 0)
    assert out.prompt_ids[0] == BOS and (out.prompt_ids + out.completions[0]).count(BOS) == 1
    out = tokenize_example(tok, Example(kind="sft", prompt="<s>Q:", completion=" A"), 0)
    assert out.prompt_ids == [BOS, 53, 30]


def test_no_bos_tokenizer(tmp_path):
    plain = train_tokenizer(bos=False)
    out = tokenize_example(plain, Example(kind="sft", prompt=COUNTING, completion=" A cat sat on the mat."), 0)
    assert out.prompt_ids == COUNTING_IDS and out.completions == [CAT_IDS + [EOS]]
    empty = Example(kind="sft", prompt="", completion=" A cat", location=Location("x.jsonl", line=4))
    with pytest.raises(DataError, match="^x.jsonl:4: the prompt is empty and the tokenizer adds no BOS"):
        tokenize_example(plain, empty, 0)


# ------------------------------------------------------------------------------- template mismatch

# Renders the last user turn with " (latest)": the prompt alone renders differently than inside
# the full conversation, where that turn is no longer the last message.
MISMATCH_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if loop.last and message['role'] == 'user' %} (latest){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def mismatch_tok():
    tokenizer = train_tokenizer()
    tokenizer.chat_template = MISMATCH_TEMPLATE
    return tokenizer


def test_template_mismatch_warns_and_cuts_at_the_common_prefix(mismatch_tok):
    ex = Example(kind="sft", prompt=[user("hi")], completion=[assistant("blue")], location=Location("c.jsonl", line=1))
    with pytest.warns(UserWarning, match="c.jsonl:1: the chat template renders the prompt differently"):
        out = tokenize_example(mismatch_tok, ex, 0)
    full = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n"
    assert out.prompt_ids + out.completions[0] == ids(mismatch_tok, full)  # still boundary exact
    assert decode(mismatch_tok, out.prompt_ids) == "<s><|im_start|>user\nhi"
    report = DataReport(source="c.jsonl", kind="sft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a report: counted, not warned
        tokenize_example(mismatch_tok, ex, 0, report=report)
    assert report.template_mismatches == 1


def test_load_dataset_warns_once_with_the_mismatch_count(tmp_path, mismatch_tok):
    rows = [{"messages": [user(f"q{i}"), assistant(f"a{i}")]} for i in range(3)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.warns(UserWarning) as caught:
        examples, report = load_dataset(path, mismatch_tok, kind="sft")
    assert len(caught) == 1 and "for 3 examples" in str(caught[0].message)
    assert report.template_mismatches == 3 and len(examples) == 3
    assert "3 chat-template prompt mismatches" in report.summary()


# --------------------------------------------------------------------------------------- truncation


def test_max_prompt_length_keeps_bos_and_the_end_of_the_prompt(tok):
    ex = Example(kind="sft", prompt=COUNTING, completion=" A cat sat on the mat.")
    out = tokenize_example(tok, ex, 0, max_prompt_length=4)
    assert out.prompt_ids == [BOS, 429, 403, 18]  # <s> nine ten .
    assert out.completions == [CAT_IDS + [EOS]] and out.truncated is True


def test_max_length_cuts_completions_from_the_right(tok):
    ex = Example(kind="pair", prompt=COUNTING, chosen=" A cat sat on the mat.", rejected=" A cat.")
    out = tokenize_example(tok, ex, 0, max_length=16)  # prompt 12 tokens -> 4 left per completion
    assert out.prompt_ids == [BOS] + COUNTING_IDS
    assert out.completions == [CAT_IDS[:4], [268, 421, 18, EOS]]  # the short one is untouched
    assert out.truncated is True
    fits = tokenize_example(tok, ex, 0, max_length=20)
    assert fits.completions[0] == CAT_IDS + [EOS] and fits.truncated is False


def test_prompt_filling_max_length_drops_the_example(tok):
    ex = Example(kind="pair", prompt=COUNTING, chosen=" A cat", rejected=" A mat")
    assert tokenize_example(tok, ex, 0, max_length=12) is None  # the prompt alone is 12 tokens
    out = tokenize_example(tok, ex, 0, max_length=12, max_prompt_length=8)  # shorten the prompt instead
    assert out.prompt_ids == [BOS] + COUNTING_IDS[-7:] and out.completions == [[268, 421, EOS], [268, 400, EOS]]


def test_load_dataset_counts_truncated_and_dropped(tmp_path, tok):
    rows = [{"prompt": "Q:", "chosen": " A cat.", "rejected": " A mat."},  # fits
            {"prompt": "Q:", "chosen": " A cat sat on the mat.", "rejected": " A mat."},  # truncated
            {"prompt": COUNTING, "chosen": " A cat.", "rejected": " A mat."}]  # no room: dropped
    examples, report = load_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, max_length=8)
    assert [e.index for e in examples] == [0, 1] and [e.location.line for e in examples] == [1, 2]
    assert [e.truncated for e in examples] == [False, True]
    assert examples[1].completions[0] == CAT_IDS[:5]
    assert (report.rows_read, report.examples_kept, report.truncated, report.dropped) == (3, 2, 1, 1)


@pytest.mark.parametrize("kwargs", [{"max_length": 0}, {"max_prompt_length": -1}, {"max_length": 2.5}])
def test_bad_lengths_are_value_errors(tok, kwargs):
    with pytest.raises(ValueError, match="must be a positive integer or None"):
        tokenize_example(tok, Example(kind="sft", prompt="Q", completion=" A"), 0, **kwargs)


def test_messages_without_a_chat_template(tok):
    no_template = train_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_example(no_template, Example(kind="sft", prompt=[user("q")], completion=[assistant("a")]), 0)


def test_template_failing_on_a_record_is_a_data_error():
    strict = train_tokenizer()
    strict.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be "
                            "system') }}{% endif %}" + CHAT_TEMPLATE)
    ex = Example(kind="sft", prompt=[user("q")], completion=[assistant("a")], location=Location("c.jsonl", line=2))
    with pytest.raises(DataError, match="^c.jsonl:2: the chat template failed on this record: first message must"):
        tokenize_example(strict, ex, 0)


def test_batched_tokenization_equals_one_by_one(tmp_path, tok):
    from preftune.data.tokenize import tokenize_examples

    examples = [Example(kind="pair", prompt=COUNTING, chosen=" A cat sat on the mat.", rejected=" A cat."),
                Example(kind="sft", prompt="A cat sat on the m", completion="at."),
                Example(kind="unpaired", prompt=[user("q")], completion=[assistant("a")], label=False),
                Example(kind="pair", prompt=COUNTING * 2, chosen=" A", rejected=" B")]  # dropped: 23-token prompt
    report = DataReport(source="t", kind="mixed")
    batched = tokenize_examples(tok, examples, max_length=14, report=report, on_bad=pytest.fail, chunk_size=2)
    single = [tokenize_example(tok, ex, i, max_length=14) for i, ex in enumerate(examples[:3])]
    assert batched == single
    assert tokenize_example(tok, examples[3], 3, max_length=14) is None
    assert (report.dropped, report.truncated, report.boundary_merges) == (1, 1, 1)
    assert report.prompt_sources == {"explicit": 3}


# ------------------------------------------------------------------------------------ load_dataset

BAD_FILE = [
    {"prompt": "Q:", "chosen": " A cat.", "rejected": " A mat."},
    '{"prompt": "Q:", "chosen": " A cat."',
    {"prompt": "Q:", "rejected": " A mat."},
    {"prompt": "Q:", "chosen": ["cat"], "rejected": " A mat."},
    {"prompt": "Q:", "chosen": "   ", "rejected": " A mat."},
    {"prompt": "Q:", "chosen": " A cat.", "rejected": " A cat."},
    {"prompt": "Q:", "chosen": " A mat.", "rejected": " A cat."},
]


def test_load_dataset_bad_records_raise_or_are_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_FILE)
    with pytest.raises(DataError) as err:
        load_dataset(path, tok)
    assert str(err.value) == f"{path}:2: invalid JSON: Expecting ',' delimiter (column 37)"
    examples, report = load_dataset(path, tok, skip_bad_records=True)
    assert [e.location.line for e in examples] == [1, 7] and [e.index for e in examples] == [0, 1]
    assert (report.rows_read, report.examples_kept, report.bad_records) == (7, 2, 5)
    assert report.bad_record_samples == [
        f"{path}:2: invalid JSON: Expecting ',' delimiter (column 37)",
        f"{path}:3: field 'chosen' is missing",
        f"{path}:4: field 'chosen' message 1: expected an object with 'role' and 'content', got str",
        f"{path}:5: field 'chosen' is empty or whitespace only",
        f"{path}:6: 'chosen' and 'rejected' are identical",
    ]
    assert report.summary() == ("7 rows -> 2 pair examples (explicit prompt 2); 5 bad, 0 truncated, "
                                "0 dropped (no room for a completion under max_length); first bad: "
                                f"{path}:2: invalid JSON: Expecting ',' delimiter (column 37)")


def test_load_summary_names_groups_pairs_and_unpaired_examples(tmp_path, tok):
    """The load log said "pair examples" for a groups file: it says "groups" (read as "pair", the kind every
    pairwise loss reads, or as "group"), both for a file mixing pair and group rows, and "unpaired examples"
    for KTO's reading of a pairs file (two per row)."""
    pair = {"prompt": "Q:", "chosen": " A cat.", "rejected": " A mat."}
    group = {"prompt": "Q:", "responses": [" A cat.", " A mat.", " A hat."], "scores": [3, 1, 2]}
    groups = write_jsonl(tmp_path / "g.jsonl", [group, group])
    mixed = write_jsonl(tmp_path / "m.jsonl", [pair, group, pair])
    pairs = write_jsonl(tmp_path / "p.jsonl", [pair, pair])
    assert load_dataset(groups, tok, kind="pair")[1].summary().startswith("2 rows -> 2 groups (")
    assert load_dataset(groups, tok, kind="group")[1].summary().startswith("2 rows -> 2 groups (")
    assert load_dataset(mixed, tok, kind="pair")[1].summary().startswith("3 rows -> 2 pair examples and 1 groups (")
    assert load_dataset(pairs, tok, kind="pair")[1].summary().startswith("2 rows -> 2 pair examples (")
    assert load_dataset(pairs, tok, kind="unpaired")[1].summary().startswith("2 rows -> 4 unpaired examples (")
    assert load_dataset(pairs, tok, kind="sft")[1].summary().startswith("2 rows -> 2 sft examples (")


def test_load_dataset_paired_file_as_unpaired_and_sft_and_limit(tmp_path, tok):
    rows = [{"prompt": "Q:", "chosen": " A cat.", "rejected": " A mat."},
            {"prompt": "Q:", "chosen": " A mat.", "rejected": " A cat."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    unpaired, report = load_dataset(path, tok, kind="unpaired")
    assert [e.label for e in unpaired] == [True, False, True, False]  # labels alternate
    assert [e.index for e in unpaired] == [0, 1, 2, 3] and report.examples_kept == 4
    assert unpaired[1].completions == [[268, 400, 18, EOS]]
    sft, _ = load_dataset(path, tok, kind="sft", limit=1)
    assert len(sft) == 1 and sft[0].completions == [[268, 421, 18, EOS]] and sft[0].label is None
    with pytest.raises(ValueError, match="unknown data kind"):
        load_dataset(path, tok, kind="dpo")


def test_load_dataset_kto_file(tmp_path, tok):
    rows = [{"prompt": [user("q")], "completion": [assistant("a")], "label": 1},
            {"prompt": "Q:", "completion": " A cat.", "label": False}]
    examples, report = load_dataset(write_jsonl(tmp_path / "kto.jsonl", rows), tok, kind="unpaired")
    assert [e.label for e in examples] == [True, False]
    assert decode(tok, examples[0].completions[0]) == "a<|im_end|>\n"


def test_hh_rlhf_end_to_end_boundary_exact(tok):
    examples, report = load_dataset(HH_FILE, tok, skip_bad_records=True)
    assert (report.rows_read, report.examples_kept, report.bad_records) == (2312, 2308, 4)
    assert report.prompt_sources == {"implicit": 2308} and report.truncated == 0 and report.dropped == 0
    rows = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")]
    for ex in examples:
        row = rows[ex.location.line - 1]
        assert decode(tok, ex.prompt_ids).endswith("\n\nAssistant:")
        for completion, text in zip(ex.completions, (row["chosen"], row["rejected"])):
            assert ex.prompt_ids + completion == ids(tok, text) + [EOS]


# ------------------------------------------------------------------------------------ response groups


def test_text_group_is_boundary_exact_per_response_and_keeps_scores(tok):
    prompt = "Human: Name a colour. Assistant:"
    replies = [" blue.", " black.", " A cat sat on the mat.", " blue."]
    out = tokenize_example(tok, Example(kind="group", prompt=prompt, responses=replies, scores=[2.0, 0.0, 1.0, 2.0]), 3)
    assert out.prompt_ids == ids(tok, prompt) and out.scores == [2.0, 0.0, 1.0, 2.0]
    assert len(out.completions) == 4 and out.completions[0] == out.completions[3]
    for completion, text in zip(out.completions, replies):
        assert out.prompt_ids + completion == ids(tok, prompt + text) + [EOS]
    assert out.num_tokens == len(out.prompt_ids) + sum(len(c) for c in out.completions)


def test_chat_group_and_truncation_of_the_longest_response(tok):
    ex = Example(kind="group", prompt=[user("Name a colour.")], scores=[1.0, 0.0, 0.5],
                 responses=[[assistant("blue")], [assistant("black")], [assistant("A cat sat on the mat.")]])
    out = tokenize_example(tok, ex, 0)
    for completion, reply in zip(out.completions, ("blue", "black", "A cat sat on the mat.")):
        full = tok.apply_chat_template([user("Name a colour."), assistant(reply)], tokenize=False)
        assert out.prompt_ids + completion == ids(tok, full)
    text = Example(kind="group", prompt=COUNTING, responses=[" A cat sat on the mat.", " A cat.", " A"],
                   scores=[0.0, 1.0, 2.0])
    cut = tokenize_example(tok, text, 0, max_length=16)  # prompt 12 tokens -> 4 left per response
    assert cut.completions == [CAT_IDS[:4], [268, 421, 18, EOS], [268, EOS]] and cut.truncated


def test_huge_group_responses_are_bounded_before_tokenizing(tok):
    """A response of 100k characters costs what max_length needs (the bound cuts every response's text)
    and gives the ids of tokenize-then-truncate."""
    from preftune.data.tokenize import bound_example

    long = " A cat sat on the mat." * 5000
    ex = Example(kind="group", prompt="Q:", responses=[long, " A cat.", long[:50]], scores=[1.0, 2.0, 3.0])
    bounded, cuts = bound_example(ex, 8)
    assert cuts == (False, True, False, False) and len(bounded.responses[0]) == 8 * 32
    assert bounded.responses[1:] == ex.responses[1:] and bounded.scores == ex.scores
    whole = tokenize_example(tok, ex, 0)
    room = 8 - len(whole.prompt_ids)
    assert tokenize_example(tok, ex, 0, max_length=8).completions == [c[:room] for c in whole.completions]
