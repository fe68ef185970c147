"""Sampling and the Monte-Carlo KL to a base model, on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.evaluation.sampling import estimate_kl, sample, sample_and_kl, sample_scored, sample_token_ids
from preftune.model.tiny import tiny_model

PROMPTS = ["Human: Tell me about the river.", "Human: Name a colour.\n\nAssistant:", "Hi"]


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Generation runs thousands of tiny matmuls; on a busy 2-core machine a second OpenMP
    thread waiting for its descheduled peer makes each one ~30 ms instead of ~50 us."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0)


def with_token_bias(model, token_id: int, bias: float):
    """A copy of ``model`` whose output head adds ``bias`` to one token's logit."""
    biased = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token_id] = bias
    biased.lm_head = head
    return biased


# ----------------------------------------------------------------------------- sample


def test_seeded_sampling_is_reproducible(model, tiny_tokenizer):
    first = sample(model, tiny_tokenizer, PROMPTS, n=3, max_new_tokens=8, seed=7, batch_size=4)
    again = sample(model, tiny_tokenizer, PROMPTS, n=3, max_new_tokens=8, seed=7, batch_size=4)
    other = sample(model, tiny_tokenizer, PROMPTS, n=3, max_new_tokens=8, seed=8, batch_size=4)
    assert first == again
    assert first != other
    assert len(first) == 3 and all(len(texts) == 3 for texts in first)
    assert all(isinstance(t, str) for texts in first for t in texts)


def test_sampling_leaves_the_global_rng_and_mode_alone(model, tiny_tokenizer):
    model.train()
    state = torch.get_rng_state()
    sample(model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    model.eval()


def test_left_padding_does_not_change_greedy_output(model, tiny_tokenizer):
    """A short prompt decodes the same alone and left-padded beside a long one."""
    short, long = "Hi", "Human: Tell me about the library and the garden and the ocean."
    alone = sample(model, tiny_tokenizer, [short], temperature=0, max_new_tokens=6)
    batched = sample(model, tiny_tokenizer, [long, short], temperature=0, max_new_tokens=6)
    assert batched[1] == alone[0]


def test_batches_group_prompts_by_length_and_results_keep_the_prompts_order(model, tiny_tokenizer, monkeypatch):
    """Prompts of mixed lengths are batched longest first (each batch padded to its own longest), and
    every completion comes back at its prompt's position: greedy output equals one-at-a-time decoding."""
    prompts = ["Hi", "Human: Tell me about the library and the garden and the ocean and the river.", "Hello there",
               "Human: Name a colour and a fruit and a river.", "Yo"]
    import preftune.evaluation.decoding as decoding

    widths = []
    original = decoding._left_pad

    def recording(chunk, pad_id):
        widths.append(max(len(ids) for ids in chunk))
        return original(chunk, pad_id)

    monkeypatch.setattr(decoding, "_left_pad", recording)
    batched = sample(model, tiny_tokenizer, prompts, temperature=0, max_new_tokens=6, batch_size=2)
    lengths = sorted((len(tiny_tokenizer(p)["input_ids"]) for p in prompts), reverse=True)
    assert widths == [lengths[0], lengths[2], lengths[4]]  # not [len of prompt 1, of prompt 3, of "Yo"]...
    assert widths[0] > widths[1] > widths[2]
    alone = [sample(model, tiny_tokenizer, [p], temperature=0, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_eos(model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    always_eos = with_token_bias(model, eos, 100.0)
    _, completions = sample_token_ids(always_eos, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=8)
    assert completions == [[eos]] * 6  # EOS kept in the ids (its probability counts) ...
    assert sample(always_eos, tiny_tokenizer, PROMPTS, max_new_tokens=8) == [[""]] * 3  # ... not in the text


def test_chat_prompts_use_the_template(model, tiny_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt_ids, _ = sample_token_ids(model, tiny_tokenizer, [messages], max_new_tokens=2)
    text = tiny_tokenizer.decode(prompt_ids[0])
    assert text.endswith("<|im_start|>assistant\n") and text.count("<s>") == 1


def test_bad_sampling_arguments(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="top_p"):
        sample(model, tiny_tokenizer, PROMPTS, top_p=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        sample(model, tiny_tokenizer, PROMPTS, n=0)


# ----------------------------------------------------------------------------- estimate_kl


def test_kl_is_zero_for_the_same_model(model, tiny_tokenizer):
    mean, stderr = estimate_kl(model, model, tiny_tokenizer, PROMPTS, n_samples=2, max_new_tokens=8)
    assert abs(mean) < 1e-6 and stderr < 1e-6
    mean, _ = estimate_kl(model, copy.deepcopy(model), tiny_tokenizer, PROMPTS, n_samples=2, max_new_tokens=8)
    assert abs(mean) < 1e-6


def test_kl_from_the_samplers_log_probs_equals_scoring_both_models_afterwards(model, tiny_tokenizer):
    """fp32: the policy's side of the estimate comes from the sampler (no second forward of the policy); it
    equals scoring the same samples under both models with ``completion_logps``, the estimate's definition."""
    from preftune.evaluation.metrics import kl_from_samples
    from preftune.evaluation.scoring import completion_logps

    policy = with_token_bias(model, tiny_tokenizer.convert_tokens_to_ids("Ġcalm"), 3.0)
    mean, stderr = estimate_kl(policy, model, tiny_tokenizer, PROMPTS, n_samples=3, max_new_tokens=8, seed=4)
    prompt_ids, completion_ids, logps = sample_scored(policy, tiny_tokenizer, PROMPTS, n=3, max_new_tokens=8,
                                                      seed=4)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        scored = completion_logps(policy, prompt_ids, completion_ids, pad)
        expected = kl_from_samples(scored, completion_logps(model, prompt_ids, completion_ids, pad))
    assert torch.allclose(logps, scored, atol=1e-4, rtol=0)
    assert abs(mean - expected[0]) < 1e-4 and abs(stderr - expected[1]) < 1e-4 and mean > 0.5


def test_sample_and_kl_reuses_the_judged_samples_only_for_the_models_own_distribution(model, tiny_tokenizer):
    """Temperature 1, top-p 1, one KL sample: the texts are sample()'s at the seed and the KL is estimate_kl's at
    the same seed (one sampling). At temperature 0.7 the KL still comes from the model's own distribution:
    estimate_kl's samples at kl_seed."""
    policy = with_token_bias(model, tiny_tokenizer.convert_tokens_to_ids("Ġcalm"), 3.0)
    options = dict(max_new_tokens=8, batch_size=2)
    texts, kl = sample_and_kl(policy, model, tiny_tokenizer, PROMPTS, 1, seed=5, **options)
    assert texts == [row[0] for row in sample(policy, tiny_tokenizer, PROMPTS, seed=5, **options)]
    assert kl == estimate_kl(policy, model, tiny_tokenizer, PROMPTS, n_samples=1, seed=5, **options)
    warm, warm_kl = sample_and_kl(policy, model, tiny_tokenizer, PROMPTS, 2, temperature=0.7, seed=5, kl_seed=9,
                                  **options)
    assert warm == [row[0] for row in sample(policy, tiny_tokenizer, PROMPTS, temperature=0.7, seed=5, **options)]
    assert warm_kl == estimate_kl(policy, model, tiny_tokenizer, PROMPTS, n_samples=2, seed=9, **options)


def test_kl_is_positive_after_favouring_a_token(model, tiny_tokenizer):
    """+5 on one token's logit: the policy emits it often, which the base finds unlikely."""
    token = tiny_tokenizer.convert_tokens_to_ids("Ġcalm")  # " calm", a word of the rule corpus
    policy = with_token_bias(model, token, 5.0)
    mean, stderr = estimate_kl(policy, model, tiny_tokenizer, PROMPTS, n_samples=4, max_new_tokens=8)
    assert mean > 1.0
    assert mean > 3 * stderr


def test_one_token_kl_estimate_matches_the_exact_kl(model, tiny_tokenizer):
    """With one new token the KL is a sum over the vocabulary: sum_t p(t) (log p(t) - log q(t)). The
    sampler's Monte-Carlo estimate over 400 draws lands within 3 standard errors of it: the sampler
    draws from the model's own distribution (a biased or shifted sampler would miss)."""
    token = tiny_tokenizer.convert_tokens_to_ids("Ġcalm")
    policy = with_token_bias(model, token, 4.0)
    prompt = PROMPTS[:1]
    ids = torch.tensor([sample_token_ids(model, tiny_tokenizer, prompt, max_new_tokens=1)[0][0]])
    with torch.no_grad():
        log_p = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
        log_q = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    mean, stderr = estimate_kl(policy, model, tiny_tokenizer, prompt, n_samples=400, max_new_tokens=1,
                               batch_size=64)
    assert exact > 0.05 and abs(mean - exact) < 3 * stderr, (mean, exact, stderr)
