"""The KV-cache sampler: hand-set logits for every sampling knob, greedy equal to Hugging Face
``generate`` token for token, per-sample reproducibility, finished rows leaving the batch."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.evaluation import decoding
from preftune.evaluation.decoding import choose_tokens, decode, sample_uniforms
from preftune.model.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


def logits_of(*probs):
    """(B, V) logits whose softmax is each given probability row."""
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in row] for row in probs])


# ----------------------------------------------------------------------------- choose_tokens (hand-set logits)


def test_inverse_cdf_draw_picks_the_interval_the_uniform_falls_in():
    # probabilities 0.5, 0.3, 0.2: running sums 0.5, 0.8, 1.0
    logits = logits_of([0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2])
    picks = choose_tokens(logits, torch.tensor([0.1, 0.49, 0.6, 0.95]))
    assert picks.tolist() == [0, 0, 1, 2]


def test_greedy_ignores_the_uniforms():
    logits = logits_of([0.2, 0.7, 0.1])
    assert choose_tokens(logits, torch.tensor([0.99]), temperature=0).tolist() == [1]


def test_temperature_sharpens_by_dividing_the_logits():
    # temperature 0.5 squares the probabilities before renormalising: 0.6, 0.4 -> 0.36/0.52, 0.16/0.52
    logits = logits_of([0.6, 0.4], [0.6, 0.4])
    cut = 0.36 / 0.52  # 0.6923
    picks = choose_tokens(logits, torch.tensor([cut - 0.01, cut + 0.01]), temperature=0.5)
    assert picks.tolist() == [0, 1]
    # at temperature 1 the cut would be at 0.6: 0.65 picks token 1 there, token 0 at temperature 0.5
    assert choose_tokens(logits[:1], torch.tensor([0.65])).tolist() == [1]
    assert choose_tokens(logits[:1], torch.tensor([0.65]), temperature=0.5).tolist() == [0]


def test_top_k_keeps_the_k_most_likely_and_renormalises():
    # top-2 of 0.4, 0.1, 0.3, 0.2 keeps tokens 0 and 2: renormalised 4/7, 3/7
    logits = logits_of(*[[0.4, 0.1, 0.3, 0.2]] * 3)
    picks = choose_tokens(logits, torch.tensor([0.5, 4 / 7 + 0.01, 0.99]), top_k=2)
    assert picks.tolist() == [0, 2, 2]


def test_top_p_keeps_tokens_until_their_mass_reaches_p():
    # 0.5, 0.3, 0.2 with top_p 0.7: token 0 (mass before it 0) and token 1 (0.5 < 0.7) kept, token 2
    # (0.8 before it) dropped: renormalised 0.625, 0.375
    logits = logits_of(*[[0.5, 0.3, 0.2]] * 3)
    picks = choose_tokens(logits, torch.tensor([0.6, 0.63, 0.999]), top_p=0.7)
    assert picks.tolist() == [0, 1, 1]
    # top_p 0.5 keeps token 0 alone (token 1 has 0.5 before it, not < 0.5)
    assert choose_tokens(logits, torch.tensor([0.0, 0.5, 0.999]), top_p=0.5).tolist() == [0, 0, 0]


def test_top_p_past_the_candidate_head_sorts_the_whole_vocabulary():
    """A flat distribution over 1,000 tokens: top_p 0.9 keeps 900 of them, more than the 256
    candidates looked at first; the draw must still range over all 900."""
    logits = torch.zeros(1, 1000)
    uniforms = torch.linspace(0, 0.999, 200)
    picks = torch.cat([choose_tokens(logits, u.view(1), top_p=0.9) for u in uniforms])
    assert picks.max().item() >= 850 and picks.unique().numel() > 150  # draws beyond the first 256 ranks


def test_zero_probability_tokens_are_never_drawn():
    logits = logits_of(*[[0.0, 1.0, 0.0]] * 3)
    assert choose_tokens(logits, torch.tensor([0.0, 0.5, 1 - 1e-12])).tolist() == [1, 1, 1]


def test_draws_follow_the_distribution():
    """20,000 draws of a 4-token distribution: frequencies within 0.015 of the probabilities."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20_000, 4)
    picks = choose_tokens(logits, sample_uniforms(1, 20_000, seed=3)[0])
    frequencies = torch.bincount(picks, minlength=4).double() / 20_000
    assert torch.allclose(frequencies, probs.double(), atol=0.015)


# ----------------------------------------------------------------------------- decode on tiny models


def prompts_for(vocab: int) -> list[list[int]]:
    """Five prompts of different lengths (ids avoid 0-2: pad, BOS, EOS of the tiny configs)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_greedy_equals_generate_token_for_token(arch):
    """fp32 greedy decoding of left-padded batches equals ``generate`` row by row (EOS off: 12 tokens each)."""
    model = tiny_model(arch, vocab_size=128, seed=1).eval()
    prompts = prompts_for(128)
    with torch.no_grad():
        ours = decode(model, prompts, max_new_tokens=12, eos_ids=[127], pad_id=0, temperature=0, batch_size=3)
        for ids, completion in zip(prompts, ours):
            reference = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                       max_new_tokens=12, do_sample=False, eos_token_id=127, pad_token_id=0)
            expected = reference[0, len(ids):].tolist()
            assert completion == expected[:len(completion)] and len(completion) == len(expected)


def test_sampling_is_reproducible_and_does_not_depend_on_the_batch():
    model = tiny_model("llama", vocab_size=128, seed=2).eval()
    prompts = prompts_for(128)
    with torch.no_grad():
        one = decode(model, prompts, max_new_tokens=10, eos_ids=[2], pad_id=0, seed=5, batch_size=1)
        five = decode(model, prompts, max_new_tokens=10, eos_ids=[2], pad_id=0, seed=5, batch_size=5)
        other = decode(model, prompts, max_new_tokens=10, eos_ids=[2], pad_id=0, seed=6, batch_size=5)
        # a shard (samples 2..4 of the whole job) gets the whole job's samples
        shard = decode(model, prompts[2:], max_new_tokens=10, eos_ids=[2], pad_id=0, seed=5, batch_size=2,
                       first_sample=2)
    assert one == five and one != other and shard == one[2:]


def test_finished_rows_leave_the_batch_and_stop_at_eos():
    """A model that says EOS right away for one prompt: that row is dropped from the cache after its first
    token while the others continue; the completion ends with the EOS."""
    model = tiny_model("llama", vocab_size=64, seed=0).eval()
    eos = 2
    with torch.no_grad():
        free = decode(model, prompts_for(64), max_new_tokens=6, eos_ids=[eos], pad_id=0, temperature=0, batch_size=5)
    first_tokens = {ids[0] for ids in free}
    stop_at = sorted(first_tokens)[0]  # pretend this token is EOS: the rows starting with it end at once
    with torch.no_grad():
        stopped = decode(model, prompts_for(64), max_new_tokens=6, eos_ids=[stop_at], pad_id=0, temperature=0,
                         batch_size=5)
    for full, cut in zip(free, stopped):
        end = next((i + 1 for i, t in enumerate(full) if t == stop_at), len(full))
        assert cut == full[:end]
    assert any(len(cut) == 1 for cut in stopped) and any(len(cut) == 6 for cut in stopped)


@pytest.mark.parametrize("vocab", [1000, 1024])
def test_two_level_draw_equals_one_running_sum_over_the_vocabulary(vocab):
    """The blocked inverse-CDF draw picks what one float64 running sum over every column picks, zeros
    included: for a vocabulary that is not a multiple of the block size (padded) and one that is (read in
    place), the blocks' own sums taken in float32."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(256, vocab, generator=g) ** 4
    probs[:, ::7] = 0
    uniforms = torch.rand(256, generator=g, dtype=torch.float64)
    from preftune.evaluation.decoding import _pick

    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    assert torch.equal(_pick(probs, uniforms), expected)


# ----------------------------------------------------------------------------- the lean forward and the fallback


def paths_taken(monkeypatch) -> list[str]:
    """Records which batch decoder :func:`decode` calls: ``lean`` or ``hf``, once per batch."""
    taken: list[str] = []
    lean, hf = decoding.decode_batch_lean, decoding.decode_batch
    monkeypatch.setattr(decoding, "decode_batch_lean", lambda *a, **k: taken.append("lean") or lean(*a, **k))
    monkeypatch.setattr(decoding, "decode_batch", lambda *a, **k: taken.append("hf") or hf(*a, **k))
    return taken


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_seeded_sampling_is_the_same_on_the_lean_and_the_hugging_face_path(arch, monkeypatch):
    """fp32, temperature 1 with top-k and top-p: the lean forward draws the tokens the Hugging Face forward
    draws, at batch sizes 2 and 5 (a finished row leaves the batch on both paths)."""
    model = tiny_model(arch, vocab_size=96, seed=3).eval()
    prompts = prompts_for(96)
    options = dict(max_new_tokens=10, eos_ids=list(range(3, 12)), pad_id=0, seed=11, top_k=40, top_p=0.95)
    taken = paths_taken(monkeypatch)
    with torch.no_grad():
        lean = [decode(model, prompts, batch_size=b, **options) for b in (2, 5)]
        assert set(taken) == {"lean"}
        monkeypatch.setattr(decoding, "lean_decoder", lambda *a, **k: None)
        hf = [decode(model, prompts, batch_size=b, **options) for b in (2, 5)]
        assert taken[-1] == "hf"
    assert lean[0] == lean[1] == hf[0] == hf[1]
    assert any(len(c) < 10 for c in lean[0]) and any(len(c) == 10 for c in lean[0])  # rows stop at different steps


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_when_finished_rows_leave_the_cache_does_not_change_the_samples(share, monkeypatch):
    model = tiny_model("llama", vocab_size=64, seed=5).eval()
    options = dict(max_new_tokens=8, eos_ids=list(range(3, 10)), pad_id=0, seed=2, batch_size=5)
    with torch.no_grad():
        default = decode(model, prompts_for(64), **options)
        monkeypatch.setattr(decoding, "COMPACT_SHARE", share)
        assert decode(model, prompts_for(64), **options) == default
    assert any(len(c) < 8 for c in default) and any(len(c) == 8 for c in default)


def test_gpt2_and_a_peft_model_take_the_hugging_face_path(monkeypatch):
    from peft import LoraConfig, get_peft_model

    taken = paths_taken(monkeypatch)
    peft = get_peft_model(tiny_model("llama", vocab_size=64), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    with torch.no_grad():
        for model in (tiny_model("gpt2", vocab_size=64).eval(), peft):
            decode(model, prompts_for(64)[:2], max_new_tokens=3, eos_ids=[2], pad_id=0, batch_size=2)
            assert taken == ["hf"]
            taken.clear()
        decode(tiny_model("llama", vocab_size=64).eval(), prompts_for(64)[:2], max_new_tokens=3, eos_ids=[2],
               pad_id=0, batch_size=2)
    assert taken == ["lean"]


def test_bf16_autocast_runs_the_lean_forward_in_bf16(monkeypatch):
    """Under bf16 autocast the lean decoder is built for bf16 (its projections in bf16) and the samples are valid
    token ids of the requested lengths."""
    built = []
    make = decoding.lean_decoder
    monkeypatch.setattr(decoding, "lean_decoder", lambda *a, **k: built.append(make(*a, **k)) or built[-1])
    model = tiny_model("llama", vocab_size=64, seed=1).eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = decode(model, prompts_for(64), max_new_tokens=5, eos_ids=[2], pad_id=0, temperature=0, batch_size=5)
    assert built[0].dtype == torch.bfloat16 and built[0].embed.dtype == torch.float32
    assert built[0].layers[0].qkv.weight.dtype == torch.bfloat16  # the fused projections in bf16
    assert built[0].k_cache is None  # the KV cache is freed when decode() returns (the decoder is kept)
    assert all(1 <= len(c) <= 5 and all(0 <= t < 64 for t in c) for c in out)


# ----------------------------------------------------------------------------- the sampler's own log-probs


def test_token_logps_are_the_raw_logits_log_softmax():
    logits = logits_of([0.5, 0.3, 0.2], [0.1, 0.0, 0.9])
    got = decoding.token_logps(logits * 2.0, torch.tensor([1, 2]))  # logits scaled: a sharper distribution
    expected = torch.log_softmax(logits * 2.0, dim=-1)[[0, 1], [1, 2]]
    assert torch.allclose(got, expected) and got.dtype == torch.float32
    assert math.isclose(float(decoding.token_logps(logits, torch.tensor([1, 2]))[0]), math.log(0.3), rel_tol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=20), dict(temperature=0)])
def test_the_sampler_scores_its_completions_as_a_scoring_forward_does(arch, settings):
    """fp32: each completion's summed log-prob from the logits it was drawn with equals scoring the finished
    completion with ``completion_logps`` (one packed forward) within 1e-4, on the lean path (Llama, Qwen2) and
    the Hugging Face path (GPT-2), rows finishing at different steps; under temperature and top-k the score is
    still the model's own log-prob, not the sampling distribution's."""
    from preftune.evaluation.scoring import completion_logps

    model = tiny_model(arch, vocab_size=96, seed=4).eval()
    prompts = prompts_for(96)
    with torch.no_grad():
        completions, scores = decoding.decode_scored(model, prompts, max_new_tokens=9, eos_ids=list(range(3, 10)),
                                                     pad_id=0, seed=3, batch_size=3, **settings)
        assert completions == decode(model, prompts, max_new_tokens=9, eos_ids=list(range(3, 10)), pad_id=0,
                                     seed=3, batch_size=3, **settings)  # scoring changes no draw
        scored = completion_logps(model, prompts, completions, pad_id=0, batch_size=4)
    assert torch.allclose(torch.tensor(scores), scored, atol=1e-4, rtol=0)
    assert len({len(c) for c in completions}) > 1 or settings.get("temperature") == 0
    assert all(s < 0 for s in scores)
