"""Readers: every source format round-trips its rows with their locations; failures are DataErrors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.data.errors import DataError
from preftune.data.readers import parse_hub_name, read_rows
from preftune.data.records import Location

ROWS = [
    {"prompt": "Q: sky?", "chosen": " blue", "rejected": " black"},
    {"prompt": "Q: grass?", "chosen": " green", "rejected": " red"},
    {"prompt": "Q: snow?", "chosen": " white", "rejected": " pink"},
]
REPO = Path(__file__).resolve().parents[2]


def _lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_jsonl_round_trip_with_line_numbers(tmp_path):
    path = tmp_path / "pairs.jsonl"
    # a blank line between records: line numbers still count it
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + _lines(ROWS[1:]))
    got = list(read_rows(str(path)))
    assert [row for _, row in got] == ROWS
    assert [loc for loc, _ in got] == [Location(str(path), line=n) for n in (1, 3, 4)]
    assert str(got[2][0]) == f"{path}:4"


def test_jsonl_gz_round_trip_and_utf8_bom(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\ufeff" + _lines(ROWS))
    got = list(read_rows(path))  # a PathLike works too
    assert [row for _, row in got] == ROWS
    assert [loc.line for loc, _ in got] == [1, 2, 3]


def test_json_array_round_trip_element_numbers(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS, indent=2))
    got = list(read_rows(str(path)))
    assert [row for _, row in got] == ROWS
    assert [loc for loc, _ in got] == [Location(str(path), line=n) for n in (1, 2, 3)]


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(_lines(ROWS))
    assert [row for _, row in read_rows(str(path))] == ROWS


def test_parquet_round_trip_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=2)  # two row groups
    got = list(read_rows(str(path)))
    assert [row for _, row in got] == ROWS
    assert [str(loc) for loc, _ in got] == [f"{path} row {i}" for i in range(3)]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    got = list(read_rows(str(single)))
    assert [row for _, row in got] == ROWS
    assert str(got[1][0]) == f"{single} row 1"

    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(both))
    assert [row for _, row in read_rows(str(both))] == ROWS[:2]  # default split: train
    got = list(read_rows(f"{both}:test"))
    assert [row for _, row in got] == ROWS[2:]
    assert str(got[0][0]) == f"{both}:test row 0"

    with pytest.raises(DataError) as err:
        read_rows(f"{both}:validation")
    assert str(err.value) == (f"{both}: no split 'validation'; available: test, train "
                              f"(pick one as '{both}:SPLIT')")
    with pytest.raises(DataError, match="holds a single Dataset, not a DatasetDict"):
        read_rows(f"{single}:test")


def test_malformed_json_line_names_file_line_and_problem(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"chosen": "a" "rejected": "b"}\n')
    rows = read_rows(str(path))
    assert next(rows)[1] == ROWS[0]
    with pytest.raises(DataError) as err:
        next(rows)
    assert str(err.value) == f"{path}:2: invalid JSON: Expecting ',' delimiter (column 16)"
    assert err.value.location == Location(str(path), line=2)


@pytest.mark.parametrize("line, message", [
    (b"[1, 2]", "expected a JSON object, got an array"),
    (b'"text"', "expected a JSON object, got a string"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 1 of the line)"),
])
def test_bad_lines(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"a": 1}\n' + line + b"\n")
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value) == f"{path}:2: {message}"


def test_on_bad_record_skips_and_goes_on(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n[]\n" + json.dumps(ROWS[1]) + "\n")
    seen: list[DataError] = []
    got = list(read_rows(str(path), on_bad_record=seen.append))
    assert [row for _, row in got] == ROWS[:2]
    assert [e.location.line for e in seen] == [2, 3]


def test_bad_json_array_element(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([ROWS[0], 7]))
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value) == f"{path}:2: array element 2: expected a JSON object, got a number"


def test_pretty_printed_single_object_in_json_file_explains(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS[0], indent=2))
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value).startswith(f"{path}:1: invalid JSON: ")
    assert str(err.value).endswith("a .json file must hold one array of objects or one object per line")


def test_truncated_json_array_gives_file_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n{"chosen": "a"},\n{"chosen": \n')
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value) == f"{path}: invalid JSON: Expecting value (line 4 column 1)"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value).startswith(f"{path}: cannot read file: ")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError) as err:
        read_rows(str(tmp_path / "nope.jsonl"))
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: no such file or folder"
    with pytest.raises(DataError, match="no such file or folder"):
        read_rows("./relative/missing")
    csv = tmp_path / "pairs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError) as err:
        read_rows(str(csv))
    assert str(err.value) == (f"{csv}: unsupported file type; use .jsonl, .jsonl.gz, .json, .parquet "
                              "or a datasets save_to_disk folder")
    bad_parquet = tmp_path / "x.parquet"
    bad_parquet.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_rows(str(bad_parquet)))


@pytest.mark.parametrize("source, expected", [
    ("Anthropic/hh-rlhf", ("Anthropic/hh-rlhf", "train")),
    ("Anthropic/hh-rlhf:test", ("Anthropic/hh-rlhf", "test")),
    ("imdb", ("imdb", "train")),
    ("trl-lib/ultrafeedback_binarized:train[:1%]", ("trl-lib/ultrafeedback_binarized", "train[:1%]")),
])
def test_parse_hub_name(source, expected):
    assert parse_hub_name(source) == expected


@pytest.mark.parametrize("source", ["a/b/c", "owner/name:", "has space/x", "-x"])
def test_parse_hub_name_rejects(source):
    with pytest.raises(DataError):
        parse_hub_name(source)


def test_hub_source_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = list(read_rows("owner/prefs:test"))
    assert calls == [("owner/prefs", "test")]
    assert [row for _, row in got] == ROWS
    assert str(got[0][0]) == "owner/prefs:test row 0"


def test_hub_failure_is_a_clean_data_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        read_rows("owner/prefs")
    assert str(err.value) == ("owner/prefs:train: no local file or folder of that name, and loading it as a hub "
                              "dataset failed: ConnectionError: Couldn't reach 'owner/prefs' on the Hub "
                              "(OfflineModeIsEnabled)")


def test_hub_offline_for_real_in_a_subprocess(tmp_path):
    """The real ``datasets`` call with the hub offline ends in one DataError line (no traceback)."""
    code = ("from preftune.data.readers import read_rows\n"
            "from preftune.data.errors import DataError\n"
            "try:\n    read_rows('someone/no-such-dataset:test')\n"
            "except DataError as err:\n    print('DataError:', err)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("DataError: someone/no-such-dataset:test: no local file or folder of that "
                                 "name, and loading it as a hub dataset failed: "), out.stdout + out.stderr
    assert out.stdout.count("\n") == 1


def test_group_files_jsonl_and_ultrafeedback_parquet(tmp_path):
    """Response groups come through the same readers: a JSON Lines file of group records, and UltraFeedback's
    raw rows (nested ``completions`` structs) in Parquet, as its hub files hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preftune.data.formats import to_example

    groups = [{"prompt": "Q: sky?", "responses": [" blue", " black", " grey"], "scores": [2, 0, 1]},
              {"prompt": "Q: snow?", "responses": [" white", " pink"], "ranks": [1, 2]}]
    path = tmp_path / "groups.jsonl"
    path.write_text(_lines(groups))
    got = [to_example(row, loc, "group") for loc, row in read_rows(str(path))]
    assert [(ex.responses, ex.scores, str(ex.location)) for ex in got] == [
        ([" blue", " black", " grey"], [2.0, 0.0, 1.0], f"{path}:1"), ([" white", " pink"], [1.0, 0.0], f"{path}:2")]

    completion = lambda text, score: {"model": "m", "response": text, "overall_score": score,  # noqa: E731
                                      "annotations": {"helpfulness": {"Rating": "4", "Rationale": "r"}}}
    rows = [{"source": "s", "instruction": "Name a colour.", "completions": [completion("blue", 7.0),
                                                                           completion("black", 3.5)]},
            {"source": "s", "instruction": "Name a fruit.", "completions": [completion("apple", 6.0),
                                                                          completion("pear", 6.0),
                                                                          completion("stone", 1.0)]}]
    parquet = tmp_path / "ultrafeedback.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    got = [to_example(row, loc, "group") for loc, row in read_rows(str(parquet))]
    assert [(ex.prompt, ex.responses, ex.scores) for ex in got] == [
        ("Name a colour.", ["blue", "black"], [7.0, 3.5]),
        ("Name a fruit.", ["apple", "pear", "stone"], [6.0, 6.0, 1.0])]
    assert str(got[1].location) == f"{parquet} row 1"
