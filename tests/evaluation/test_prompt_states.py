"""Prompt states (:mod:`preftune.evaluation.prompt_states`): completions scored on each prompt's kept keys and
values equal the full forward in float32 (causal LMs with and without q/k/v bias, a Llama reward model); the
states are kept in a file, read back by the next call on the same model and prompts, and a changed weight or
prompt is a new file; the KL and the reward-model judge use them; an identical response is a tie."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from preftune.evaluation import prompt_states as ps
from preftune.evaluation import sampling
from preftune.evaluation.judges.base import ScoringJudge
from preftune.evaluation.scoring import completion_logps
from preftune.model.fast_decode import lean_decoder
from preftune.model.tiny import tiny_config, tiny_model

VOCAB = 96


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


def _data(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ten (prompt, completion) rows over four prompts of 7, 1, 12 and 4 tokens (each used 2-3 times), with
    completions of 0 to 9 tokens; no id is 0 (the padding id)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 1, 12, 4)]
    prompt_ids = [prompts[i % 4] for i in range(10)]
    completion_ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 0, 9, 3, 2, 6, 1, 4, 8)]
    return prompt_ids, completion_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_completion_logps_on_prompt_states_equal_the_full_forward(arch):
    model = tiny_model(arch, vocab_size=VOCAB, seed=3, heads=4, layers=3).eval()  # 4 query heads, 2 KV heads
    prompt_ids, completion_ids = _data(0)
    expected = completion_logps(model, prompt_ids, completion_ids, pad_id=0, batch_size=3)
    lean = lean_decoder(model)
    states = ps.PromptStates.compute(lean, prompt_ids, batch_size=2, pad_id=0)
    assert len(states.prompts) == 4 and states.keys.shape[2] == 7 + 1 + 12 + 4  # each prompt once
    for batch_size in (1, 3, 10):
        got = ps.completion_logps_with_states(lean, states, prompt_ids, completion_ids, batch_size)
        assert got[2] == 0 == expected[2]  # an empty completion
        assert (got - expected).abs().max().item() < 1e-4, batch_size
    assert expected[[0, 1, 3, 4, 5, 6, 7, 8, 9]].abs().min() > 1.0  # real log-probs of 1 to 9 tokens over 96 ids


def test_reward_model_scores_on_prompt_states_equal_the_full_forward():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(
        tiny_config("llama", VOCAB, num_labels=1, heads=4, layers=3)).eval()
    prompt_ids, completion_ids = _data(1)
    lean = lean_decoder(model)
    states = ps.PromptStates.compute(lean, prompt_ids, batch_size=4, pad_id=0)
    got = ps.scores_with_states(lean, states, prompt_ids, completion_ids, batch_size=3)
    with torch.no_grad():
        expected = torch.tensor([model(torch.tensor([p + c])).logits[0, 0].item()
                                 for p, c in zip(prompt_ids, completion_ids)])
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std() > 1e-3  # the scores differ from row to row


def test_states_are_kept_in_a_file_and_read_back(tmp_path, monkeypatch):
    model = tiny_model("llama", vocab_size=VOCAB, seed=3, heads=4, layers=3).eval()
    prompt_ids, completion_ids = _data(2)
    computed = []
    compute = ps.PromptStates.compute
    monkeypatch.setattr(ps.PromptStates, "compute", classmethod(
        lambda cls, lean, ids, *args: computed.append(len(ids)) or compute(lean, ids, *args)))
    first = ps.states_for(model, prompt_ids, 4, 0, None, tmp_path, "base")
    (kept,) = tmp_path.glob("prompt-states-base-*.safetensors")
    second = ps.states_for(model, prompt_ids, 4, 0, None, tmp_path, "base")
    assert computed == [10]  # the second call read the file
    assert torch.equal(first[1].keys, second[1].keys) and torch.equal(first[1].last, second[1].last)
    scores = [ps.completion_logps_with_states(*found, prompt_ids, completion_ids, 3) for found in (first, second)]
    assert torch.equal(scores[0], scores[1])
    some = ps.states_for(model, prompt_ids[1:3], 4, 0, None, tmp_path, "base")  # some of the prompts: read
    assert computed == [10] and torch.equal(some[1].keys, first[1].keys)
    new = [[5, 6, 7], [8]]
    grown = ps.states_for(model, prompt_ids[:2] + new, 4, 0, None, tmp_path, "base")  # new ones: added
    assert computed == [10, 2] and len(grown[1].prompts) == 6 and list(tmp_path.glob("prompt-states-base-*")) == [kept]
    rows, replies = prompt_ids + new, completion_ids + [[9, 10], [11]]  # the merged states score as the full forward
    assert (ps.completion_logps_with_states(*grown, rows, replies, 4)
            - completion_logps(model, rows, replies, 0, 4)).abs().max() < 1e-4
    ps.states_for(model, prompt_ids, 4, 0, None, tmp_path, "base")
    assert computed == [10, 2]  # the grown file holds the first prompts too
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # other weights: another file
    changed = ps.states_for(model, prompt_ids, 4, 0, None, tmp_path, "base")
    assert computed == [10, 2, 10] and len(list(tmp_path.glob("prompt-states-base-*"))) == 2
    assert not torch.equal(changed[1].keys, first[1].keys)
    key = kept.stem.removeprefix("prompt-states-base-")
    assert ps.PromptStates.load(kept, key, torch.device("cpu")) is not None
    assert ps.PromptStates.load(kept, "another key", torch.device("cpu")) is None
    kept.write_bytes(b"not a safetensors file")  # a damaged file: None (the caller computes again), no error
    assert ps.PromptStates.load(kept, key, torch.device("cpu")) is None


def test_over_the_budget_or_off_the_lean_forward_there_are_no_states(monkeypatch):
    model = tiny_model("llama", vocab_size=VOCAB, seed=3, heads=4, layers=3).eval()
    prompt_ids, _ = _data(0)
    # 24 prompt tokens x 3 layers x 2 KV heads x head-dim 16 x keys and values x 4 bytes: what the states hold
    states = ps.PromptStates.compute(lean_decoder(model), prompt_ids, 4, 0)
    assert ps.states_bytes(model, prompt_ids, None) == 24 * 3 * 2 * 16 * 2 * 4 == 2 * states.keys.nbytes
    monkeypatch.setattr(ps, "STATES_BUDGET", 24 * 3 * 2 * 16 * 2 * 4 - 1)
    assert ps.states_for(model, prompt_ids, 4, 0, None, None, "base") is None
    monkeypatch.setattr(ps, "STATES_BUDGET", 1 << 30)
    assert ps.states_for(tiny_model("gpt2", vocab_size=VOCAB), prompt_ids, 4, 0, None, None, "base") is None


def test_kl_on_prompt_states_scores_the_base_as_the_full_forward(tmp_path, monkeypatch):
    model = tiny_model("llama", vocab_size=VOCAB, seed=3, heads=4, layers=3).eval()
    base = tiny_model("llama", vocab_size=VOCAB, seed=4, heads=4, layers=3).eval()
    prompt_ids, completion_ids = _data(3)
    model_logps = completion_logps(model, prompt_ids, completion_ids, pad_id=0, batch_size=4)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    base_logps = []  # what the KL is computed from: the base's log-probs of the model's samples
    monkeypatch.setattr(sampling, "kl_from_samples", lambda ours, theirs: base_logps.append(theirs) or (0.0, 0.0))
    sampling._kl_on_samples(model, base, tokenizer, prompt_ids, completion_ids, model_logps, 4, None, tmp_path)
    assert list(tmp_path.glob("prompt-states-base-*.safetensors"))
    monkeypatch.setattr(sampling, "states_for", lambda *args: None)  # the full forward of every text
    sampling._kl_on_samples(model, base, tokenizer, prompt_ids, completion_ids, model_logps, 4, None)
    on_states, full = base_logps
    assert (on_states - full).abs().max().item() < 1e-4 and full.abs().max() > 10
    assert not torch.equal(full, model_logps)  # the base's, not the model's


class NoisyJudge(ScoringJudge):
    """Scores at random: only the identical-response rule can make a tie."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.random = random.Random(0)

    def score(self, prompts, responses):
        self.calls.append(list(responses))
        return [self.random.random() for _ in responses]


def test_an_identical_response_ties_and_is_scored_once():
    judge = NoisyJudge()
    result = judge.compare(["p", "q", "r"], ["same", "a", "also"], ["same", "b", "also"])
    assert result.outcomes[0] == result.outcomes[2] == 0.5 and result.outcomes[1] in (0.0, 1.0)
    assert judge.calls == [["same", "a", "also", "b"]]
