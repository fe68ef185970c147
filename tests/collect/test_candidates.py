"""``preftune generate --keep-all``: every sample per prompt, a candidates file the labelling app reads."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli.main import main
from preftune.collect.candidates import read_tasks
from preftune.evaluation.judges.registry import make_judge
from preftune.evaluation.pairs import candidate_records


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)  # generation is many tiny matmuls: a second thread only waits


def test_candidate_records_with_and_without_a_scoring_judge(tmp_path):
    judge_file = tmp_path / "judge.py"
    judge_file.write_text("def length(prompt, response):\n    return len(response)\n")
    samples = [["a", "bbb", ""], ["cc", "d", "eeee"]]
    plain = candidate_records(["p1", "p2"], samples, meta={"model": "m"})
    assert plain == [{"prompt": "p1", "responses": ["a", "bbb", ""], "meta": {"model": "m", "n": 3}},
                     {"prompt": "p2", "responses": ["cc", "d", "eeee"], "meta": {"model": "m", "n": 3}}]
    scored = candidate_records(["p1", "p2"], samples, make_judge(f"python:{judge_file}:length"))
    assert [r["meta"]["scores"] for r in scored] == [[1.0, 3.0, 0.0], [2.0, 1.0, 4.0]]


def test_generate_keep_all_writes_candidates(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The river is\nThe garden is\n")
    out = tmp_path / "candidates.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--n", "3",
                 "--keep-all", "--out", str(out), "--max-new-tokens", "4", "--seed", "1"])
    assert code == 0
    assert f"2 prompts with 3 responses each written to {out}" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["The river is", "The garden is"]
    assert all(len(r["responses"]) == 3 and all(isinstance(t, str) for t in r["responses"]) for r in records)
    assert records[0]["meta"] == {"model": str(tiny_model_dir), "temperature": 1.0, "top_p": 1.0,
                                  "max_new_tokens": 4, "seed": 1, "n": 3}
    tasks = read_tasks(out)  # the labelling app takes it as it is
    assert [t.mode for t in tasks] == ["rank", "rank"] and tasks[1].responses == records[1]["responses"]


def test_generate_needs_a_judge_unless_keep_all(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The river is\n")
    code = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "pairs.jsonl")])
    assert code == 1
    assert "--judge is required" in capsys.readouterr().err


def test_a_candidates_path_that_is_no_readable_file_is_one_error(tmp_path, monkeypatch):
    from preftune.collect import candidates as candidates_module
    from preftune.collect.candidates import file_sha256
    from preftune.data.errors import DataError

    with pytest.raises(DataError, match=r"is a folder, not a candidates file"):
        file_sha256(tmp_path)
    with pytest.raises(DataError, match=r"is a folder, not a candidates file"):
        read_tasks(tmp_path)
    with pytest.raises(DataError, match=r"missing.jsonl: no such file"):
        file_sha256(tmp_path / "missing.jsonl")

    def refused(path, *args, **kwargs):  # what a user without read permission gets (root reads anything)
        raise PermissionError(13, "Permission denied", str(path))

    (tmp_path / "c.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"]}\n')
    monkeypatch.setattr(candidates_module, "open", refused, raising=False)
    with pytest.raises(DataError, match=r"c.jsonl: cannot read file: .*Permission denied"):
        file_sha256(tmp_path / "c.jsonl")
