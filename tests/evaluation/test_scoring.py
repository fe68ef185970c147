"""Log-probs of finished replies (the scoring path), on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from preftune.evaluation.scoring import sequence_logps
from preftune.model.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Many tiny forwards: one intra-op thread, as in test_sampling.py."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0)


# ----------------------------------------------------------------------------- sequence_logps


def test_sequence_logps_matches_a_manual_forward(model, tiny_tokenizer):
    """Sum over completion tokens of log_softmax(logits[t - 1])[token t], from one unpadded forward."""
    prompt, completion = "Human: Name a colour.\n\nAssistant:", " blue and black"
    prompt_ids = tiny_tokenizer(prompt)["input_ids"]
    joint_ids = tiny_tokenizer(prompt + completion)["input_ids"]
    assert joint_ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logps = model(torch.tensor([joint_ids])).logits[0].log_softmax(-1)  # (L, V)
    expected = sum(logps[t - 1, joint_ids[t]].item() for t in range(len(prompt_ids), len(joint_ids)))
    got = sequence_logps(model, tiny_tokenizer, [prompt, "Hi"], [completion, " a much longer completion here"])
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(expected, abs=1e-4)


def test_sequence_logps_padding_and_eos(model, tiny_tokenizer):
    prompts = ["Hi", "Human: Tell me about the mountain."]
    completions = [" The mountain is kind and calm.", " ok"]
    batched = sequence_logps(model, tiny_tokenizer, prompts, completions, batch_size=2)
    single = sequence_logps(model, tiny_tokenizer, prompts, completions, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-4)
    with_eos = sequence_logps(model, tiny_tokenizer, prompts, completions, append_eos=True)
    assert (with_eos < batched).all()  # plus log p(EOS) < 0
    assert sequence_logps(model, tiny_tokenizer, ["Hi"], [""]).tolist() == [0.0]
