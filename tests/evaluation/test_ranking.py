"""Held-out preferences as rankings: the labels of pairs and groups, the best responses' NLL examples, and a
reward model's metrics on pairs and groups (by hand, and end to end on a tiny reward model)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_jsonl

from preftune.config.eval_config import EvalConfig
from preftune.data import load_dataset
from preftune.data.records import TokenizedExample
from preftune.evaluation.evaluate import evaluate_model
from preftune.evaluation.ranking import best_index, label_scores, reward_model_preference
from preftune.evaluation.report_table import format_table
from preftune.model.loading import load_model, load_tokenizer

LENGTHS = dict(max_length=64, max_prompt_length=32)


def example(index: int, completions: list[list[int]], scores: list[float] | None = None) -> TokenizedExample:
    return TokenizedExample(index=index, prompt_ids=[1, 2], completions=completions, scores=scores)


def test_label_scores_of_pairs_and_groups():
    """A pair is scored [1, 0]; a group its own scores, 0 and masked beyond its responses."""
    pair = example(0, [[5], [6]])
    group = example(1, [[5], [6], [7]], [2.0, -1.0, 2.0])
    scores, mask = label_scores([pair, group])
    assert scores.tolist() == [[1.0, 0.0, 0.0], [2.0, -1.0, 2.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_the_best_response_is_the_first_top_scored_one():
    groups = [example(0, [[5], [6, 6], [7]], [0.0, 3.0, 3.0]), example(1, [[8], [9]], [1.0, 2.0])]
    assert best_index(groups).tolist() == [1, 1]


def test_reward_model_preference_by_hand():
    """Group 0: rewards [2, 1, 3], scores [2, 1, 0]: ordered pairs (0 > 1) agrees, (0 > 2) and (1 > 2) do
    not; group 1 (a pair): rewards [0.5, -0.5] agrees. Over the 4 pairs: accuracy 2/4, reward of the better
    (2 + 2 + 1 + 0.5) / 4, of the worse (1 + 3 + 3 - 0.5) / 4, BT loss mean softplus(worse - better).
    Tau-b: group 0 has no ties, 1 concordant, 2 discordant: -1/3; the pair +1; mean 1/3."""
    rewards = torch.tensor([[2.0, 1.0, 3.0], [0.5, -0.5, 0.0]])
    out = reward_model_preference(rewards, [example(0, [[5], [6], [7]], [2.0, 1.0, 0.0]), example(1, [[5], [6]])])
    assert (out["pairs"], out["groups"], out["ordered_pairs"]) == (4, 2, 4)
    assert out["accuracy"] == out["ranking_accuracy"] == 0.5
    assert out["accuracy_low"] < 0.5 < out["accuracy_high"]
    assert out["reward_chosen"] == pytest.approx(5.5 / 4) and out["reward_rejected"] == pytest.approx(6.5 / 4)
    assert out["reward_margin"] == pytest.approx(-0.25)
    margins = [1.0, -1.0, -2.0, 1.0]
    assert out["bt_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 4, abs=1e-6)
    assert out["kendall_tau"] == pytest.approx((-1 / 3 + 1) / 2) and out["tau_groups"] == 2
    assert "better" in out["accuracy_definition"] and out["chosen_logp_change"] is None
    with pytest.raises(ValueError, match="all its responses tied"):
        reward_model_preference(rewards[:1], [example(0, [[5], [6], [7]], [1.0, 1.0, 1.0])])


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a random one-logit head, saved as a reward model folder."""
    folder = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), head="reward").eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


def test_reward_model_is_evaluated_on_groups(reward_model_dir, tmp_path):
    """``preftune eval --model RM --data groups.jsonl``: each response's reward from the packed group forward
    equals the model's own score of its prompt + response, so the accuracy over ordered pairs is the hand
    computation's; the table shows the groups and the ranking rows."""
    rows = [{"prompt": "\n\nHuman: Tell me about the river.\n\nAssistant:",
             "responses": [" The river is kind.", " The river is rude and cold.", " The river is calm."],
             "scores": [2, 0, 1]},
            {"prompt": "\n\nHuman: Tell me about the city.\n\nAssistant:",
             "responses": [" The city is grim.", " The city is warm and fair."], "ranks": [2, 1]}]
    data = write_jsonl(tmp_path / "groups.jsonl", rows)
    result = evaluate_model(EvalConfig(model=str(reward_model_dir), data=str(data), batch_size=2, **LENGTHS))
    examples, _ = load_dataset(data, load_tokenizer(str(reward_model_dir)), "group", **LENGTHS)
    model = load_model(str(reward_model_dir), head="reward").eval()
    with torch.no_grad():
        rewards = [[model(torch.tensor([ex.prompt_ids + c])).logits[0, 0].item() for c in ex.completions]
                   for ex in examples]
    table = torch.zeros(2, 3)
    for g, values in enumerate(rewards):
        table[g, :len(values)] = torch.tensor(values)
    expected = reward_model_preference(table, examples)
    pref = result["preference"]
    assert result["kind"] == "reward" and pref["groups"] == 2 and pref["pairs"] == 4
    for key in ("accuracy", "ranking_accuracy", "kendall_tau", "reward_margin", "bt_loss"):
        assert pref[key] == pytest.approx(expected[key], abs=1e-5), key
    text = format_table(result)
    assert "held-out groups" in text and "2, 4 ordered pairs" in text and "Kendall tau-b" in text
