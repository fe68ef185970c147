"""The fused bf16 decode-step kernels (preftune/model/decode_kernels.cpp): each against the Hugging Face
formula it replaces (bit for bit where that forward rounds the same way, within half a bf16 step of the
exact attention), the decoder's step with them against its ATen step and the float32 forward, and the
fallbacks (opt-out, a failed build)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from preftune.model import decode_kernels
from preftune.model.fast_decode import LeanDecoder, lean_decoder
from preftune.model.tiny import tiny_model

pytestmark = pytest.mark.skipif(decode_kernels._capability() not in decode_kernels._FLAGS,
                                reason="the kernels are built for x86 CPUs with AVX-512 only")


@pytest.fixture(scope="module")
def ops():
    # on an AVX-512 CPU with a compiler (CI's) the build must succeed: a failure is a test failure
    assert decode_kernels.available(), decode_kernels._unavailable_reason()  # built (or loaded) once
    return torch.ops.preftune_decode


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face LlamaRMSNorm, then the cast to bf16 a bf16 linear applies to its input."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(torch.bfloat16)


@pytest.mark.parametrize("dim", [576, 40])  # 40: a row that is not a whole number of vectors
@pytest.mark.parametrize("stream", [torch.bfloat16, torch.float32])
def test_add_rms_norm_is_the_residual_add_and_the_hugging_face_norm_bit_for_bit(ops, dim, stream):
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(7, dim, generator=g) * 3).to(stream)
    y = torch.randn(7, dim, generator=g).bfloat16()
    weight = (torch.rand(dim, generator=g) + 0.5).to(stream)
    summed = x + y  # the residual add in the stream's dtype (bf16 + bf16 rounds; float32 + bf16 is float32)
    updated = x.clone()
    h = ops.add_rms_norm(updated, y, weight, 1e-5)
    assert torch.equal(updated, summed)
    assert h.dtype == torch.bfloat16 and torch.equal(h, hf_rms_norm(summed, weight, 1e-5))
    untouched = x.clone()
    assert torch.equal(ops.add_rms_norm(untouched, None, weight, 1e-6), hf_rms_norm(x, weight, 1e-6))
    assert torch.equal(untouched, x)


@pytest.mark.parametrize("width", [1536, 40])
def test_silu_mul_is_silu_of_the_gate_times_the_up_product_bit_for_bit(ops, width):
    gate_up = (torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(1)) * 4).bfloat16()
    gate, up = gate_up.split(width, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), F.silu(gate) * up)


def rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([positions[:, None].float() * inv] * 2, dim=-1)
    signed_sin = emb.sin()
    signed_sin[:, : head_dim // 2].neg_()
    return emb.cos().bfloat16(), signed_sin.bfloat16()


# (query heads, KV heads, head size): compiled shapes (3 and 4 heads per KV head at 64 and 128) and one the
# kernel runs with loop bounds known only at run time (10 heads per KV head)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 128), (10, 1, 64)])
def test_decode_attention_writes_the_rotated_key_and_attends_within_half_a_bf16_step(ops, heads, kv_heads,
                                                                                       head_dim):
    g = torch.Generator().manual_seed(heads)
    batch, total, column = 5, 24, 17
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=g).bfloat16()
    cos, signed_sin = rotary(torch.randint(10, 60, (batch,), generator=g), head_dim)
    k_cache = torch.randn(batch, kv_heads, total, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(batch, kv_heads, total, head_dim, generator=g).bfloat16()
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[1, :6] = valid[3, :11] = False  # left padding
    # what must never be read: padding columns and the columns after the new one
    for cache in (k_cache, v_cache):
        cache[1, :, :6] = cache[3, :, :11] = float("nan")
        cache[:, :, column + 1:] = float("nan")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q_k = qkv[:, : (heads + kv_heads) * head_dim].view(batch, heads + kv_heads, head_dim)
    rotated = LeanDecoder._rotate(q_k, cos[:, None], signed_sin[:, None])  # the ATen step's rotation, in bf16
    q, k = rotated.split((heads, kv_heads), dim=1)
    expected_k[:, :, column] = k
    expected_v[:, :, column] = qkv[:, (heads + kv_heads) * head_dim:].view(batch, kv_heads, head_dim)

    out = ops.decode_attention(qkv, cos, signed_sin, k_cache, v_cache, valid, column, heads, kv_heads,
                               head_dim ** -0.5)
    assert torch.equal(k_cache[:, :, : column + 1].nan_to_num(7.0), expected_k[:, :, : column + 1].nan_to_num(7.0))
    assert torch.equal(v_cache[:, :, : column + 1].nan_to_num(7.0), expected_v[:, :, : column + 1].nan_to_num(7.0))

    keys = expected_k[:, :, : column + 1].double().nan_to_num(0.0)
    values = expected_v[:, :, : column + 1].double().nan_to_num(0.0)
    groups = heads // kv_heads
    scores = torch.einsum("bkgd,bkld->bkgl", q.double().view(batch, kv_heads, groups, head_dim), keys)
    scores = (scores * head_dim ** -0.5).masked_fill(~valid[:, None, None, : column + 1], float("-inf"))
    exact = torch.einsum("bkgl,bkld->bkgd", scores.softmax(-1), values).reshape(batch, heads * head_dim)
    assert out.dtype == torch.bfloat16 and out.shape == (batch, heads * head_dim)
    error = (out.double() - exact).abs()
    assert (error <= exact.abs() * 2.0 ** -8 + 1e-6).all(), error.max().item()  # one rounding of a float result


def test_the_decode_step_with_the_kernels_tracks_the_float32_forward_as_closely_as_the_aten_step(ops):
    """A tiny Llama with 64-wide heads (2 query heads on 1 KV head): bf16 prefill of three left-padded
    prompts, then five steps (one row leaving after the second), once with the kernels and once with the
    ATen step from the same cache. Each step's logits: the kernels' distance to the float32 Hugging Face
    logits at most 1.5x the ATen step's (plus 0.02), and the two steps within 0.1 of each other; with
    float32 weights (a float32 residual stream) and with bf16 weights."""
    torch.set_num_threads(2)
    for weights in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", vocab_size=96, seed=3, hidden=128, heads=2, layers=2).eval()
        reference = tiny_model("llama", vocab_size=96, seed=3, hidden=128, heads=2, layers=2).eval()
        model = model.to(weights)
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 2, 9)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            fused, plain = LeanDecoder(model, torch.bfloat16), LeanDecoder(model, torch.bfloat16)
            assert fused.kernels and plain.kernels
            plain.kernels = False
            fused.prefill(ids, mask, max_new_tokens=6)
            plain.prefill(ids, mask, max_new_tokens=6)
            for step in range(5):
                tokens = torch.randint(3, 96, (ids.shape[0],), generator=g)
                ids = torch.cat([ids, tokens[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                got, aten = fused.step(tokens), plain.step(tokens)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                exact = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                ours, theirs = (got - exact).abs().max().item(), (aten - exact).abs().max().item()
                assert ours <= 1.5 * theirs + 0.02, (weights, step, ours, theirs)
                assert (got - aten).abs().max().item() < 0.1, (weights, step)
                if step == 1:
                    keep = torch.tensor([0, 2])
                    fused.keep_rows(keep)
                    plain.keep_rows(keep)
                    ids, mask = ids[keep], mask[keep]


def test_the_kernel_step_is_deterministic(ops):
    """The same prefill and tokens twice: the kernels' logits bit-equal (each row and KV head is computed by
    one thread, whatever the split)."""
    torch.set_num_threads(2)
    model = tiny_model("llama", vocab_size=96, seed=1, hidden=128, heads=2, layers=2).eval()
    ids, mask = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    runs = []
    with torch.no_grad():
        for _ in range(2):
            lean = LeanDecoder(model, torch.bfloat16)
            assert lean.kernels
            logits = [lean.prefill(ids, mask, max_new_tokens=4)]
            for token in (11, 12, 13):
                logits.append(lean.step(torch.tensor([token, token + 1])))
            runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])


def test_a_model_the_kernels_do_not_take_and_the_opt_out_keep_the_aten_step(ops, monkeypatch):
    model = tiny_model("llama", vocab_size=64).eval()  # 16-wide heads: not a whole number of bf16 vectors
    assert not decode_kernels.supports(4, 2, 16) and not LeanDecoder(model, torch.bfloat16).kernels
    assert not LeanDecoder(tiny_model("llama", vocab_size=64, hidden=128, heads=2)).kernels  # float32 compute
    bf16_model = tiny_model("llama", vocab_size=64, hidden=128, heads=2).eval()
    assert lean_decoder(bf16_model, torch.bfloat16).kernels
    monkeypatch.setenv(decode_kernels.ENV, "0")
    assert not decode_kernels.available()
    opted_out = lean_decoder(bf16_model, torch.bfloat16)  # not the kept decoder built with the kernels
    assert not opted_out.kernels
    monkeypatch.delenv(decode_kernels.ENV)
    assert lean_decoder(bf16_model, torch.bfloat16).kernels


@pytest.mark.slow
def test_a_failed_build_leaves_sampling_on_the_aten_step(tmp_path):
    """No C++ compiler (CXX=false) and an empty extensions folder: the build fails, the reason is logged,
    and a bf16 decoder still prefills and steps (the ATen path)."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from preftune.model import decode_kernels\n"
        "from preftune.model.fast_decode import LeanDecoder\n"
        "from preftune.model.tiny import tiny_model\n"
        "lean = LeanDecoder(tiny_model('llama', vocab_size=64, hidden=128, heads=2).eval(), torch.bfloat16)\n"
        "with torch.no_grad():\n"
        "    logits = lean.prefill(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), 2)\n"
        "    logits = lean.step(logits.argmax(-1))\n"
        "print('kernels', lean.kernels, 'finite', bool(logits.isfinite().all()))\n"
    )
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop(decode_kernels.ENV, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels False finite True" in done.stdout
    assert "fused decode kernels not used: build failed" in done.stderr
