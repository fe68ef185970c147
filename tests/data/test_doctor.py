"""The data doctor: every problem counted with its place, real HH-RLHF numbers, CLI exit codes."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import rule_pairs, write_jsonl

from preftune.cli.data import register
from preftune.data import load_dataset
from preftune.data.doctor import check_data, truncation_outcome
from preftune.data.doctor_report import LengthStats
from preftune.model.tiny import train_tokenizer


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def unique_pairs(n: int) -> list[dict]:
    return [pair(f"Question {i}?", f" answer {i} is kind", f" answer {i} is rude!") for i in range(n)]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def counts(report) -> dict[str, int]:
    return {f.check: f.count for f in report.findings}


# ------------------------------------------------------------------------------- the shared HH file


def test_hh_rlhf_real_statistics(hh_rlhf_path):
    """Numbers measured on Anthropic HH-RLHF harmless-base test (2312 rows), no tokenizer."""
    report = check_data(hh_rlhf_path)
    assert (report.file_format, report.kind, report.rows, report.valid) == ("JSON Lines (gzip)", "pair", 2312, 2308)
    assert report.record_formats == {"implicit prompt (dialogue text)": 2308}
    assert report.prompt_sources == {"implicit": 2308}
    assert report.length_unit.startswith("approximate tokens (characters / 4")
    assert report.lengths == {"prompt": LengthStats(122.0, 91, 357, 875), "chosen": LengthStats(42.5, 28, 128, 270),
                              "rejected": LengthStats(53.2, 37, 154, 618)}
    assert counts(report) == {"size": 2308, "bad records": 0, "prompt extraction": 0, "empty responses": 4,
                              "identical pairs": 0, "exact duplicates": 0, "near duplicates": 0,
                              "conflicting pairs": 0, "turn markers in responses": 5, "length bias": 1025}
    empty = report.finding("empty responses")
    assert empty.severity == "error"
    assert empty.locations == [f"{hh_rlhf_path}:{line}: field 'chosen' is empty or whitespace only"
                               for line in (87, 517, 926, 1104)]
    assert report.finding("turn markers in responses").locations == [
        f"{hh_rlhf_path}:1255 (chosen)", f"{hh_rlhf_path}:1689 (chosen)", f"{hh_rlhf_path}:1951 (rejected)",
        f"{hh_rlhf_path}:1953 (chosen)", f"{hh_rlhf_path}:2037 (chosen)"]
    size = report.finding("size")
    assert (size.severity, size.message) == ("ok", "2308 valid pairs of 2312 rows, 2306 distinct prompts")
    bias = report.finding("length bias")  # 1025 / (1025 + 1272) = 44.6%: rejected replies run longer
    assert bias.severity == "ok"
    assert bias.message == ("chosen longer in 44.6% of pairs that differ in length (1025 longer, 1272 shorter, "
                            "11 equal, in characters)")
    assert [f.check for f in report.errors] == ["empty responses"] and report.exit_code == 1
    assert json.loads(json.dumps(report.to_dict()))["lengths"]["prompt"] == {"mean": 122.0, "p50": 91, "p95": 357,
                                                                            "max": 875}


# ------------------------------------------------------------------------------- planted problems


PLANTED = [
    '{"prompt": "What colour is the sky?", "chosen": " Blue.", "rejected": " Green."}',  # 1 good
    '{"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A rock."}',  # 2 good
    '{"prompt": "What colour is the sky?", "chosen": " Blue.", "rejected": " Green."}',  # 3 exact duplicate of 1
    '{"prompt": "what colour is the  sky", "chosen": " blue", "rejected": "  GREEN "}',  # 4 near duplicate of 1
    '{"prompt": "Name a fruit.", "chosen": " A rock.", "rejected": " An apple."}',  # 5 contradicts 2
    '{"prompt": "Q?", "chosen": " same", "rejected": " same"}',  # 6 identical
    '{"prompt": "Q2?", "chosen": "   ", "rejected": " no"}',  # 7 empty (whitespace) response
    '{"chosen": "no dialogue A", "rejected": "no dialogue B"}',  # 8 no prompt to extract
    '{"prompt": "Q3?", "chosen": " yes"}',  # 9 missing field
    '{"prompt": "Q4?", "chosen": " a" "rejected": " b"}',  # 10 malformed JSON
    '',  # 11 blank: skipped, not a record
    '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: go away"}',  # 12
    '["not", "an", "object"]',  # 13
]


def test_planted_problems_are_all_found_with_locations(tmp_path):
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(PLANTED) + "\n")
    report = check_data(path)
    assert (report.rows, report.valid) == (12, 6)  # reads past every bad record
    assert report.record_formats == {"standard": 5, "implicit prompt (dialogue text)": 1}
    assert report.prompt_sources == {"explicit": 5, "implicit": 1}
    assert counts(report) == {"size": 6, "bad records": 3, "prompt extraction": 1, "empty responses": 1,
                              "identical pairs": 1, "exact duplicates": 1, "near duplicates": 1,
                              "conflicting pairs": 1, "length bias": 1}
    where = lambda check: report.finding(check).locations  # noqa: E731
    assert [loc.split(": ")[0] for loc in where("bad records")] == [f"{path}:9", f"{path}:10", f"{path}:13"]
    assert where("prompt extraction")[0].startswith(f"{path}:8: no 'prompt' field")
    assert where("empty responses") == [f"{path}:7: field 'chosen' is empty or whitespace only"]
    assert where("identical pairs") == [f"{path}:6: 'chosen' and 'rejected' are identical"]
    assert where("exact duplicates") == [f"{path}:3 (same as line 1)"]
    assert where("near duplicates") == [f"{path}:4 (like line 1)"]
    assert where("conflicting pairs") == [f"{path}:5 (opposite of line 2)"]
    severities = {f.check: f.severity for f in report.findings}
    assert severities == {"size": "warning", "bad records": "error", "prompt extraction": "error",
                          "empty responses": "error", "identical pairs": "error", "exact duplicates": "warning",
                          "near duplicates": "warning", "conflicting pairs": "warning", "length bias": "warning"}
    # chosen longer in 1 of the 6 good pairs (characters): far below 40%
    assert report.finding("length bias").message.startswith("chosen longer in 16.7% of pairs")
    text = report.to_text()
    assert "ERROR    identical pairs" in text and f"{path}:5 (opposite of line 2)" in text
    assert "result: 4 errors, 5 warnings (exit code 1)" in text


def test_under_1000_pairs_is_a_warning_and_1000_is_not(tmp_path):
    small = check_data(write_jsonl(tmp_path / "small.jsonl", unique_pairs(999)))
    assert small.finding("size").severity == "warning" and "under 1000" in small.finding("size").message
    assert small.exit_code == 0  # warnings never fail the check
    assert check_data(write_jsonl(tmp_path / "big.jsonl", unique_pairs(1000))).finding("size").severity == "ok"


def test_length_bias_warns_outside_40_to_60_percent(tmp_path):
    rows = unique_pairs(10)  # chosen " answer i is kind" is 1 character shorter than rejected " ... rude!"
    assert check_data(write_jsonl(tmp_path / "a.jsonl", rows)).finding("length bias").severity == "warning"
    balanced = rows[:5] + [pair(r["prompt"], r["rejected"], r["chosen"]) for r in rows[5:]]
    bias = check_data(write_jsonl(tmp_path / "b.jsonl", balanced)).finding("length bias")
    assert (bias.severity, bias.count) == ("ok", 5)


# ------------------------------------------------------------------------------- lengths and truncation


def test_truncation_rule_by_hand():
    assert truncation_outcome(10, [5, 7], max_length=None, max_prompt_length=None) == "kept"
    assert truncation_outcome(10, [5, 7], max_length=17, max_prompt_length=None) == "kept"  # 10 + 7 fits
    assert truncation_outcome(10, [5, 8], max_length=17, max_prompt_length=None) == "truncated"
    assert truncation_outcome(10, [5, 8], max_length=10, max_prompt_length=None) == "dropped"  # no room left
    assert truncation_outcome(10, [5, 8], max_length=10, max_prompt_length=4) == "truncated"  # prompt cut to 4
    assert truncation_outcome(10, [1, 1], max_length=None, max_prompt_length=9) == "truncated"


def test_truncation_counts_with_a_tokenizer_match_training(tmp_path, tiny_tokenizer):
    rows = rule_pairs(60, seed=5)
    for i in range(0, 60, 7):  # some long prompts, so max_length alone drops pairs
        rows[i] = {k: "\n\nHuman: " + "kind calm " * 12 + v for k, v in rows[i].items()}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    full, _ = load_dataset(path, tiny_tokenizer)
    report = check_data(path, tokenizer=tiny_tokenizer, max_length=24)
    assert report.length_unit == "tokens (prompt with BOS, responses with EOS)"
    assert report.lengths["prompt"].max == max(len(ex.prompt_ids) for ex in full)
    assert report.lengths["rejected"].max == max(len(ex.completions[1]) for ex in full)
    for max_length, max_prompt_length in ((24, None), (20, 12), (None, 8)):
        report = check_data(path, tokenizer=tiny_tokenizer, max_length=max_length,
                            max_prompt_length=max_prompt_length)
        _, trained = load_dataset(path, tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        assert (report.finding("truncated").count, report.finding("dropped").count) == (trained.truncated,
                                                                                        trained.dropped)
    assert (trained.truncated, trained.dropped) == (60, 0)
    report = check_data(path, tokenizer=tiny_tokenizer, max_length=24)
    dropped = report.finding("dropped")
    assert dropped.count == 9 and dropped.severity == "warning"
    assert dropped.locations[:2] == [f"{path}:1", f"{path}:8"]
    approx = check_data(path, max_length=24).finding("truncated")
    assert "(approximate: no tokenizer)" in approx.message


def test_messages_without_chat_template_fall_back_to_characters(tmp_path):
    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]
    report = check_data(write_jsonl(tmp_path / "m.jsonl", rows), tokenizer=tokenizer)
    assert report.record_formats == {"conversational": 3}
    assert report.finding("tokenizer").severity == "error" and "chat template" in report.finding("tokenizer").message
    assert report.length_unit.startswith("approximate")


# ------------------------------------------------------------------------------- leaks, KTO, CLI


def test_train_eval_leak_is_an_error_with_both_places(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [pair("Alpha?", " a", " b"), pair("Beta, please.", " a", " b"),
                                                   pair("Gamma?", " a", " b")])
    leaky = write_jsonl(tmp_path / "eval.jsonl", [pair("beta please", " x", " y"), pair("Delta?", " x", " y")])
    leak = check_data(train, eval_path=leaky).finding("train/eval leak")
    assert (leak.severity, leak.count) == ("error", 1)
    assert leak.locations == [f"{train}:2 = {leaky}:1: 'Beta, please.'"]
    clean = write_jsonl(tmp_path / "clean.jsonl", [pair("Delta?", " x", " y")])
    assert check_data(train, eval_path=clean).finding("train/eval leak").severity == "ok"


def test_kto_file_labels_and_contradictions(tmp_path):
    rows = [{"prompt": "Q?", "completion": " yes", "label": True},
            {"prompt": "Q?", "completion": " yes", "label": False},
            {"prompt": "R?", "completion": " no", "label": True}]
    report = check_data(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert (report.kind, report.valid, report.record_formats) == ("unpaired", 3, {"KTO (text)": 3})
    assert report.finding("conflicting pairs").locations == [f"{tmp_path / 'kto.jsonl'}:2 (opposite of line 1)"]
    assert report.finding("labels").message == "2 desirable, 1 undesirable"
    one_label = check_data(write_jsonl(tmp_path / "one.jsonl", rows[:1]))
    assert one_label.finding("labels").severity == "error" and one_label.exit_code == 1


def test_cli_check_exit_code_and_json(tmp_path, capsys, tiny_tokenizer):
    clean = write_jsonl(tmp_path / "clean.jsonl", unique_pairs(20))
    assert run_cli(["data", "check", str(clean)]) == 0  # a size warning only
    assert "WARNING  size" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(PLANTED[:7]) + "\n")
    assert run_cli(["data", "check", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 1 and report["rows"] == 7
    assert {f["check"]: f["count"] for f in report["findings"]}["identical pairs"] == 1
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert run_cli(["data", "check", str(clean), "--tokenizer", str(tmp_path / "tok"), "--max-length", "14"]) == 0
    out = capsys.readouterr().out  # prompts of 10-11 tokens leave 3-4 for responses of 10-12
    assert "lengths   in tokens" in out and "WARNING  truncated                      20" in out
    assert run_cli(["data", "check", str(clean), "--tokenizer", str(tmp_path / "tok"), "--max-length", "8"]) == 1
    assert "ERROR    dropped                        20" in capsys.readouterr().out  # nothing left to train on
    with pytest.raises(SystemExit):
        run_cli(["data", "check", str(clean), "--max-length", "0"])
    assert "expects a positive integer" in capsys.readouterr().err


def test_missing_file_is_one_data_error(tmp_path):
    from preftune.data import DataError

    with pytest.raises(DataError, match="no such file"):
        check_data(tmp_path / "nope.jsonl")



# ------------------------------------------------------------------------------- response groups


def group(prompt, responses, scores):
    return {"prompt": prompt, "responses": responses, "scores": scores}


def test_response_groups_sizes_ties_duplicates_and_the_best_responses_length(tmp_path):
    """Groups of 4, 3 and 2 responses: an all-tied group, a group repeating a response (up to case and
    punctuation), a group of one (a bad record naming its line and field), and best responses always the
    longest (a length bias warning)."""
    rows = [group(f"Question {i}?", [f" a long good answer {i}", " bad", " worse!", " no"], [3, 1, 0, 1])
            for i in range(6)]
    rows += [group("Tied?", [" one", " two", " three"], [2, 2, 2]),
             group("Again?", [" Same answer.", " other text", " same answer"], [1, 0, 2]),
             group("Alone?", [" only"], [1]),
             {"instruction": "UltraFeedback?", "completions": [{"response": " a longer best", "overall_score": 8},
                                                               {"response": " short", "overall_score": 2}]}]
    path = write_jsonl(tmp_path / "groups.jsonl", rows)
    report = check_data(path, max_length=40)
    assert (report.kind, report.rows, report.valid) == ("group", 10, 9)
    assert report.record_formats == {"group (text)": 9}
    assert set(report.lengths) == {"prompt", "responses"}
    found = {f.check: f for f in report.findings}
    assert found["bad records"].locations == [f"{path}:9: field 'responses' holds 1 response(s); a group needs at "
                                              "least 2"]
    assert found["group sizes"].message == "responses per prompt: k=2: 1, k=3: 2, k=4: 6"
    assert (found["all-tied groups"].severity, found["all-tied groups"].locations) == ("warning", [f"{path}:7"])
    assert found["duplicate responses"].locations == [f"{path}:8 (responses 1 and 3)"]
    bias = found["length bias"]
    # 6 groups x 3 longer; "Again?": best " same answer" (12 characters) shorter than " Same answer." (13),
    # longer than " other text" (11); UltraFeedback's row 1 longer: 20 of 21
    assert bias.severity == "warning" and bias.message.startswith("best response longer in 95.2% of its comparisons")
    assert "(20 longer, 1 shorter, in characters)" in bias.message
    assert "conflicting pairs" not in found and found["exact duplicates"].count == 0
    assert report.exit_code == 1  # the bad record
    text = report.to_text()
    assert "valid groups" in text and "all-tied groups" in text


def test_group_duplicates_compare_scores_and_truncation_counts_each_response(tmp_path):
    rows = [group("Q?", [" a", " b"], [1, 0]), group("Q?", [" a", " b"], [1, 0]), group("Q?", [" a", " b"], [0, 1]),
            group("P" * 200, [" x", " y"], [1, 0]), group("R?", [" x", " z", " y" * 100], [1, 0, 2])]
    report = check_data(write_jsonl(tmp_path / "g.jsonl", rows), max_length=40)
    assert counts(report)["exact duplicates"] == 1  # the third has other scores: not a duplicate
    # a 200-character prompt (~50 tokens) leaves no room; a 200-character third response is cut
    assert counts(report)["dropped"] == 1 and report.finding("truncated").locations == [f"{tmp_path / 'g.jsonl'}:5"]
