"""One data and log-prob path: generation scoring = the training path = a brute-force forward.

``sequence_logps`` / ``completion_logps`` / ``estimate_kl`` and the prompts ``sample_token_ids``
samples on must be exactly what training builds (``tokenize_examples`` -> collate ->
``batch_logps``), and that path must be right: a plain full-logits forward of one unpadded
sequence at a time, log-softmax, gather, is the independent reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

import preftune.model.packing as packing_check
from preftune.data.collate import collate_packed, collate_padded
from preftune.data.report import DataReport
from preftune.data.records import Example
from preftune.data.tokenize import render_prompt, tokenize_examples
from preftune.evaluation.sampling import estimate_kl, sample_token_ids
from preftune.evaluation.scoring import completion_logps, sequence_logps
from preftune.model.logprobs import batch_logps
from preftune.model.tiny import CHAT_TEMPLATE, tiny_model

# The last plain prompt ends in a space: BPE merges it into the completion's first word, and the
# training path moves that token to the completion (the prompt ids get shorter).
PLAIN = (["Human: Tell me about the river.\n\nAssistant:", "Hi", "Human: Tell me about the garden.\n\nAssistant: "],
         [" The river is calm and kind.", " ok", "The garden is warm."])
CHAT = ([[{"role": "user", "content": "Tell me about the river."}],
         [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "Tell me about the garden."}]],
        ["The river is calm and kind.", "ok", "The garden is warm."])
CASES = {"plain": PLAIN, "chat": CHAT}


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)  # many tiny forwards: see tests/evaluation/test_sampling.py


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0)


@pytest.fixture(params=["packed", "padded"])
def layout(request, monkeypatch):
    """Run each test with the packed collate (the tiny Llama supports it) and with the padded one."""
    if request.param == "padded":
        monkeypatch.setattr(packing_check, "supports_packing", lambda model: (False, "test: padded"))
    return request.param


def training_examples(tokenizer, prompts, completions):
    """The SFT examples training builds from these texts (chat replies as assistant messages)."""
    examples = [Example(kind="sft", prompt=p, completion=c if isinstance(p, str) else
                        [{"role": "assistant", "content": c}]) for p, c in zip(prompts, completions)]

    def fail(error):
        raise error

    return tokenize_examples(tokenizer, examples, report=DataReport("test", "sft"), on_bad=fail)


def training_logps(model, examples, layout: str, pad_id: int) -> torch.Tensor:
    """(S,) what the training loop's batch + ``batch_logps`` give for these examples."""
    collate = collate_packed if layout == "packed" else collate_padded
    with torch.no_grad():
        return batch_logps(model, collate(examples, pad_id=pad_id)).logps


def brute_force_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """(S,) the reference: one unpadded sequence per forward, full logits, log_softmax, gather."""
    totals = []
    with torch.no_grad():
        for prompt, completion in zip(prompt_ids, completion_ids):
            ids = prompt + completion
            logps = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (L, V)
            # Logits at position t - 1 predict token t.
            totals.append(sum(logps[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))))
    return torch.tensor(totals, dtype=torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_sequence_logps_is_the_training_path_and_right(model, tiny_tokenizer, case, layout):
    """append_eos=True scores exactly the training examples' ids (plain: EOS appended; chat: the
    template's end of turn), and those scores are the brute-force forward's."""
    assert packing_check.supports_packing(model)[0] == (layout == "packed")
    prompts, completions = CASES[case]
    examples = training_examples(tiny_tokenizer, prompts, completions)
    prompt_ids = [ex.prompt_ids for ex in examples]
    completion_ids = [ex.completions[0] for ex in examples]
    if case == "plain":
        assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in completion_ids)
        assert len(prompt_ids[2]) < len(tiny_tokenizer(prompts[2])["input_ids"])  # the boundary merge
    else:
        assert all(tiny_tokenizer.decode(ids).endswith("<|im_end|>\n") for ids in completion_ids)

    got = sequence_logps(model, tiny_tokenizer, prompts, completions, batch_size=2, append_eos=True)
    from_ids = completion_logps(model, prompt_ids, completion_ids, tiny_tokenizer.pad_token_id, batch_size=2)
    training = training_logps(model, examples, layout, tiny_tokenizer.pad_token_id)
    reference = brute_force_logps(model, prompt_ids, completion_ids)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (3,)
    torch.testing.assert_close(got, training, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_ids, training, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_sequence_logps_without_the_ending(model, tiny_tokenizer, case, layout):
    """append_eos=False: the completion text's own tokens after the rendered prompt, no EOS and no
    end of turn; the same ids through the training path's plain-text tokenization."""
    prompts, completions = CASES[case]
    rendered = [render_prompt(tiny_tokenizer, p) for p in prompts]
    examples = training_examples(tiny_tokenizer, rendered, completions)
    prompt_ids = [ex.prompt_ids for ex in examples]
    completion_ids = [ex.completions[0][:-1] for ex in examples]  # the appended EOS dropped
    got = sequence_logps(model, tiny_tokenizer, prompts, completions, batch_size=2)
    torch.testing.assert_close(got, brute_force_logps(model, prompt_ids, completion_ids), atol=1e-4, rtol=0)
    finished = sequence_logps(model, tiny_tokenizer, prompts, completions, append_eos=True)
    assert (finished < got).all()  # plus the log-prob of stopping
    assert sequence_logps(model, tiny_tokenizer, prompts[:1], [""]).tolist() == [0.0]
    if case == "plain":  # a text that ends with EOS keeps it
        torch.testing.assert_close(sequence_logps(model, tiny_tokenizer, ["Hi"], [" ok</s>"]),
                                   sequence_logps(model, tiny_tokenizer, ["Hi"], [" ok"], append_eos=True))
    empty_finished = sequence_logps(model, tiny_tokenizer, prompts[:1], [""], append_eos=True)
    assert empty_finished.item() < 0  # the log-prob of stopping at once


def test_completion_logps_on_sampled_ids(model, tiny_tokenizer, layout):
    """Sampled ids of every length (early EOS, cut at max_new_tokens, empty) are scored right and
    returned in input order, whatever the batch size."""
    prompts = [CHAT[0][0], PLAIN[0][0], "Hi"]
    prompt_ids, completion_ids = sample_token_ids(model, tiny_tokenizer, prompts, n=2, max_new_tokens=8, seed=3)
    prompt_ids, completion_ids = prompt_ids + [prompt_ids[0]], completion_ids + [[]]  # and an empty one
    reference = brute_force_logps(model, prompt_ids, completion_ids)
    for batch_size in (1, 3, 8):
        got = completion_logps(model, prompt_ids, completion_ids, tiny_tokenizer.pad_token_id, batch_size)
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
        assert got[-1].item() == 0.0 and not got.requires_grad


def test_completion_logps_keeps_the_mode_and_runs_16_bit_models(model, tiny_tokenizer, layout):
    examples = training_examples(tiny_tokenizer, *PLAIN)
    ids = ([ex.prompt_ids for ex in examples], [ex.completions[0] for ex in examples])
    fp32 = completion_logps(model, *ids, tiny_tokenizer.pad_token_id)
    model.train()
    try:
        again = completion_logps(model, *ids, tiny_tokenizer.pad_token_id)
        assert model.training
    finally:
        model.eval()
    torch.testing.assert_close(again, fp32, atol=0, rtol=0)  # eval mode inside: no dropout difference
    bf16_weights = completion_logps(copy.deepcopy(model).to(torch.bfloat16), *ids, tiny_tokenizer.pad_token_id)
    autocast = completion_logps(model, *ids, tiny_tokenizer.pad_token_id, compute_dtype=torch.bfloat16)
    for low in (bf16_weights, autocast):
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, fp32, atol=0.05, rtol=0)  # bf16 rounding: ~3e-3 here


@pytest.mark.parametrize("case", [*CASES, "template writes BOS"])
def test_sampled_prompt_ids_are_the_training_prompt_ids(model, tiny_tokenizer, case):
    if case == "template writes BOS":  # the tokenizer's BOS must then not be added a second time
        tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
        tiny_tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    prompts, completions = CASES.get(case, CHAT)
    prompts, completions = prompts[:2], completions[:2]  # the third merges across the boundary
    training = [ex.prompt_ids for ex in training_examples(tiny_tokenizer, prompts, completions)]
    sampled, _ = sample_token_ids(model, tiny_tokenizer, prompts, n=2, max_new_tokens=1)
    assert sampled == [ids for ids in training for _ in range(2)]
    assert all(ids.count(tiny_tokenizer.bos_token_id) == 1 for ids in sampled)


def test_kl_to_itself_is_zero(model, tiny_tokenizer, layout):
    prompts = [CHAT[0][0], *PLAIN[0]]
    mean, stderr = estimate_kl(model, model, tiny_tokenizer, prompts, n_samples=2, max_new_tokens=8)
    assert mean == 0.0 and stderr == 0.0
    mean, _ = estimate_kl(model, copy.deepcopy(model), tiny_tokenizer, prompts, n_samples=2, max_new_tokens=8)
    assert abs(mean) < 1e-6
