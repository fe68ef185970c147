"""Log-probs from the model: packed prefix-shared == padded == each sequence alone.

The acceptance test (PITFALLS, "Packing and prefix sharing"): per-sequence summed log-probs
and the parameter gradients of a DPO-style loss agree to 1e-4 (fp32) between the packed,
padded and naive paths, for every architecture we claim. The naive path runs the whole
model (full logits, plain autograd) on each unpadded sequence alone.
"""

import math

import pytest
import torch
from torch import nn

from preftune.data.collate import collate_packed, collate_padded
from preftune.data.records import TokenizedExample
from preftune.model.logprobs import LogProbModel, batch_logps, chunked_target_logps
from preftune.model.masks import packed_attention_mask
from preftune.model.packing import supports_packing
from preftune.model.tiny import tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
VOCAB = 512


def make_examples(seed=0):
    """Pairs of very different lengths: prompt 3 vs 60 tokens, completion 1 vs 40."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return [
        TokenizedExample(index=0, prompt_ids=ids(3), completions=[ids(40), ids(1)]),
        TokenizedExample(index=1, prompt_ids=ids(60), completions=[ids(1), ids(40)]),
        TokenizedExample(index=2, prompt_ids=ids(10), completions=[ids(7), ids(12)]),
    ]


def model_for(arch, attn="sdpa", **config):
    return tiny_model(arch, vocab_size=VOCAB, attn_implementation=attn, **config).eval()  # eval: no dropout


def naive_logps(model, examples, kl=False):
    """(S,) summed log-probs, each sequence run alone through the full model (s = k * G + g)."""
    g_count = len(examples)
    k_count = 2 if kl else len(examples[0].completions)
    out = []
    for k in range(k_count):
        for g, ex in enumerate(examples):
            completion = examples[(g + 1) % g_count].completions[0] if kl and k == 1 else ex.completions[k]
            ids = torch.tensor([ex.prompt_ids + completion])
            logp = model(ids).logits[0].log_softmax(-1)  # (T, V)
            p_len = len(ex.prompt_ids)
            out.append(logp[p_len - 1:-1].gather(1, ids[0, p_len:, None]).sum())
    return torch.stack(out)


def dpo_style_loss(logps, g_count):
    ref = torch.linspace(-30.0, -10.0, 2 * g_count)  # fixed "reference" numbers
    chosen, rejected = logps[:g_count], logps[g_count:]
    return -nn.functional.logsigmoid(0.1 * ((chosen - ref[:g_count]) - (rejected - ref[g_count:]))).sum()


def logps_and_grads(model, run):
    model.zero_grad()
    logps = run()
    dpo_style_loss(logps, len(logps) // 2).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, ref, rtol=1e-4):
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        scale = ref[name].norm()
        assert (g - ref[name]).norm() <= rtol * scale + 1e-12, f"{name}: {(g - ref[name]).norm() / scale:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_padded_naive_agree(arch):
    model = model_for(arch)
    examples = make_examples()
    ref_logps, ref_grads = logps_and_grads(model, lambda: naive_logps(model, examples))
    full_pack = len(examples[1].prompt_ids) + 41  # group 1 fills a whole row exactly
    batches = {
        "padded": collate_padded(examples, 0),
        "packed": collate_packed(examples, 0),
        "packed_full_row": collate_packed(examples, 0, pack_tokens=full_pack),
        "packed_one_row": collate_packed(examples, 0, pack_tokens=10_000),
    }
    assert batches["packed_full_row"].input_ids.shape == (2, full_pack)
    for name, batch in batches.items():
        cache = 0 if name == "packed_one_row" else 2**20  # head softmax recomputed / kept for backward
        logps, grads = logps_and_grads(model, lambda: batch_logps(model, batch, chunk_size=16, cache_bytes=cache).logps)
        assert (logps - ref_logps).abs().max() < 1e-4, name
        assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_eager_matches_sdpa(arch):
    examples = make_examples(1)
    batch = collate_packed(examples, 0, pack_tokens=10_000)
    runs = {}
    for attn in ("sdpa", "eager"):
        model = model_for(arch, attn)
        runs[attn] = logps_and_grads(model, lambda: batch_logps(model, batch).logps)
    assert (runs["sdpa"][0] - runs["eager"][0]).abs().max() < 1e-4
    assert_grads_close(runs["eager"][1], runs["sdpa"][1])


@pytest.mark.parametrize("arch,config", [
    ("mistral", dict(sliding_window=8)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention"])),  # mixed: per-layer mask dict
])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window(arch, config, attn):
    model = model_for(arch, attn, **config)
    assert supports_packing(model)[0]
    examples = make_examples(2)
    with torch.no_grad():
        ref = naive_logps(model, examples)
        unwindowed = naive_logps(model_for(arch, attn), examples)
        assert (ref - unwindowed).abs().max() > 1e-2  # the window changes the result
        for batch in (collate_padded(examples, 0), collate_packed(examples, 0, pack_tokens=10_000)):
            assert (batch_logps(model, batch).logps - ref).abs().max() < 1e-4


def test_kl_completions_and_train_on_prompt():
    model = model_for("llama")
    examples = [TokenizedExample(index=i, prompt_ids=ex.prompt_ids, completions=ex.completions[:1], label=i == 1)
                for i, ex in enumerate(make_examples(3))]
    with torch.no_grad():
        ref = naive_logps(model, examples, kl=True)
        for collate in (collate_padded, collate_packed):
            out = batch_logps(model, collate(examples, 0, kl_completions=True))
            assert (out.logps - ref).abs().max() < 1e-4
        padded = batch_logps(model, collate_padded(examples, 0, train_on_prompt=True))
        packed = batch_logps(model, collate_packed(examples, 0, train_on_prompt=True))
    assert torch.equal(padded.counts, packed.counts)
    assert (padded.logps - packed.logps).abs().max() < 1e-4
    assert (padded.token_logps - packed.token_logps).abs().max() < 1e-4


def test_output_fields():
    model = model_for("llama")
    batch = collate_packed(make_examples(), 0)
    out = batch_logps(model, batch)
    assert out.logps.shape == (6,) and out.logps.dtype == torch.float32
    assert out.counts.tolist() == [40, 1, 7, 1, 40, 12]
    assert out.token_logps.shape == (len(batch.token_seq),)
    assert torch.allclose(out.mean_logps, out.logps / out.counts)
    with torch.no_grad():  # reference forward: same numbers without a graph
        no_grad = batch_logps(model, batch)
    assert not no_grad.logps.requires_grad
    assert (no_grad.logps - out.logps).abs().max() < 1e-5
    assert torch.allclose(LogProbModel(model)(batch).logps, out.logps)


def test_position_restart_detection_is_bypassed(monkeypatch):
    """transformers must not infer packed sequences from position ids: our 4D mask decides."""
    import transformers.masking_utils as masking_utils

    def fail(*args, **kwargs):
        raise AssertionError("find_packed_sequence_indices was called")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", fail)
    for arch in ("llama", "gpt2"):
        batch_logps(model_for(arch), collate_packed(make_examples(), 0))


def test_supports_packing_refusals():
    model = model_for("llama")
    model.config._attn_implementation = "flash_attention_2"
    ok, why = supports_packing(model)
    assert not ok and "flash_attention_2" in why
    with pytest.raises(ValueError, match="cannot run a packed batch"):
        batch_logps(model, collate_packed(make_examples(), 0))


def test_eager_mask_is_additive_in_model_dtype():
    model = model_for("llama", "eager")
    batch = collate_packed(make_examples(), 0)
    mask = packed_attention_mask(model, batch)
    assert mask.dtype == torch.float32 and mask.shape == batch.attention_mask.shape
    assert torch.equal(mask == 0, batch.attention_mask)


# ----------------------------------------------------------------------------- the head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("cache_bytes", [0, 2**20])  # softmax recomputed in backward / kept
def test_chunked_head_matches_full_logits(bias, train_weight, cache_bytes):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen).requires_grad_(train_weight)
    b = torch.randn(v, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)  # arbitrary dL/dlogp per token

    def grads(fn):
        out = fn()
        inputs = [x for x in (hidden, weight, b) if x is not None and x.requires_grad]
        return out.detach(), torch.autograd.grad((out * upstream).sum(), inputs)

    def full():
        logits = hidden @ weight.t() + (b if bias else 0)
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    ref_out, ref_grads = grads(full)
    out, got = grads(lambda: chunked_target_logps(hidden, weight, b, targets, chunk_size=7,  # 8 chunks
                                                  cache_bytes=cache_bytes))
    assert (out - ref_out).abs().max() < 1e-5
    for g, r in zip(got, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_head_is_exact_for_large_logits(grad):
    """The in-place softmax (logits overwritten by exp(logits - max)) matches log_softmax, also far from 0."""
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(30, 16, generator=gen) * 40).requires_grad_(grad)  # logits in the hundreds
    weight = torch.randn(500, 16, generator=gen)
    targets = torch.randint(0, 500, (30,), generator=gen)
    out = chunked_target_logps(hidden, weight, None, targets, chunk_size=8)
    ref = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max().clamp(min=1)


def test_chunked_head_bf16_computes_in_fp32():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 16, generator=gen).bfloat16()
    weight = torch.randn(300, 16, generator=gen).bfloat16()
    targets = torch.randint(0, 300, (20,), generator=gen)
    out = chunked_target_logps(hidden, weight, None, targets, chunk_size=8)
    ref = (hidden.float() @ weight.float().t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()  # bf16 inputs, fp32 softmax


class WrappedHead(nn.Module):
    """Stands in for a LoRA- or quantization-wrapped lm_head (not a plain nn.Linear)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_non_linear_head_module_and_full_logits_fallback():
    model = model_for("llama")
    examples = make_examples()
    batch = collate_packed(examples, 0)
    ref_logps, ref_grads = logps_and_grads(model, lambda: batch_logps(model, batch, chunk_size=16).logps)
    model.lm_head = WrappedHead(model.lm_head)  # -> checkpointed chunks through the module
    logps, grads = logps_and_grads(model, lambda: batch_logps(model, batch, chunk_size=16).logps)
    ref_grads = {n.replace("lm_head.", "lm_head.linear."): g for n, g in ref_grads.items()}
    assert (logps - ref_logps).abs().max() < 1e-5
    assert_grads_close(grads, ref_grads)
    model.config.final_logit_softcapping = 30.0  # llama ignores it: the fallback must agree
    logps, grads = logps_and_grads(model, lambda: batch_logps(model, batch).logps)
    assert (logps - ref_logps).abs().max() < 1e-4
    assert_grads_close(grads, ref_grads)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = model_for("llama")
    examples = make_examples()
    with torch.no_grad():
        base_logps = batch_logps(model, collate_packed(examples, 0)).logps
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                      init_lora_weights=False))
    ref_logps, ref_grads = logps_and_grads(lora, lambda: naive_logps(lora, examples))
    logps, grads = logps_and_grads(lora, lambda: batch_logps(lora, collate_packed(examples, 0)).logps)
    assert any("lora_" in name for name in grads)
    assert (logps - ref_logps).abs().max() < 1e-4
    assert_grads_close(grads, ref_grads)
    assert (logps - base_logps).abs().max() > 1e-3  # the adapters are active ...
    with torch.no_grad(), lora.disable_adapter():  # ... and "adapters off" is the base model
        assert (batch_logps(lora, collate_packed(examples, 0)).logps - base_logps).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_log_sum_sq_for_wpo_matches_full_logits(arch):
    """WPO's per-token log sum_v p(v)^2 from the chunked no-grad head pass equals the one from the model's
    full logits (fp32, 1e-5), on a packed batch; it carries no gradient and leaves the log-probs unchanged.
    Hand check of the quantity: a uniform distribution over V gives log(V * (1/V)^2) = -log V."""
    model = model_for(arch)
    examples = make_examples()
    batch = collate_packed(examples, 0, pack_tokens=10_000)
    plain = batch_logps(model, batch, chunk_size=16)
    out = batch_logps(model, batch, chunk_size=16, with_log_sum_sq=True)
    assert plain.token_log_sum_sq is None and torch.equal(out.token_logps, plain.token_logps)
    logits = model(input_ids=batch.input_ids, attention_mask=packed_attention_mask(model, batch),
                   position_ids=batch.position_ids).logits[batch.token_rows, batch.token_cols]
    expected = torch.logsumexp(2 * logits.float().log_softmax(-1), dim=-1)
    assert (out.token_log_sum_sq - expected).abs().max() < 1e-5
    assert not out.token_log_sum_sq.requires_grad
    vocab = 7
    uniform = torch.logsumexp(2 * torch.zeros(1, vocab).log_softmax(-1), dim=-1)
    assert uniform.item() == pytest.approx(-math.log(vocab))
