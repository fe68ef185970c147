"""Prompts read from a file for sampling: every record shape training reads gives its prompt."""

from __future__ import annotations

import json

import pytest

from preftune.data.errors import DataError
from preftune.evaluation.prompts import read_prompts


def test_prompts_of_every_record_shape(tmp_path):
    rows = [{"prompt": "P1", "chosen": "a", "rejected": "b"},
            {"chosen": "\n\nHuman: P2\n\nAssistant: a", "rejected": "\n\nHuman: P2\n\nAssistant: b"},
            {"prompt": "P3", "responses": ["a", "b"], "scores": [1, 0]},
            {"instruction": "P4", "completions": [{"response": "a", "overall_score": 2},  # UltraFeedback's raw row
                                                  {"response": "b", "overall_score": 1}]},
            {"messages": [{"role": "user", "content": "P5"}, {"role": "assistant", "content": "a"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = read_prompts(path)
    assert prompts[0] == "P1" and "P2" in prompts[1] and prompts[2:4] == ["P3", "P4"]
    assert prompts[4] == [{"role": "user", "content": "P5"}]
    assert read_prompts(path, limit=2) == prompts[:2]


def test_a_record_without_a_prompt_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*no prompt"):
        read_prompts(path)
