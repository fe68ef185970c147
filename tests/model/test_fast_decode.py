"""The lean decode forward: the Hugging Face forward's logits over a left-padded prefill and decode steps
(rows leaving the batch on the way), for Llama, Qwen2 (q/k/v bias) and Mistral; what falls back."""

from __future__ import annotations

import pytest
import torch

from preftune.model.fast_decode import LeanDecoder, lean_decoder, unsupported_reason
from preftune.model.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def hf_last_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the last column from the Hugging Face forward over the whole left-padded sequence."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_logits_equal_the_hugging_face_forward(arch):
    """Prefill of four left-padded prompts (lengths 1 to 9), then six decode steps; after the third
    step rows 1 and 3 leave the batch. Every step's logits within 1e-4 of the Hugging Face forward."""
    model = tiny_model(arch, vocab_size=96, seed=4, heads=4, layers=3).eval()  # 4 query heads, 2 KV heads
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the bias path is exercised
    g = torch.Generator().manual_seed(0)
    ids, mask = left_padded([torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 9, 5, 1)])
    with torch.no_grad():
        lean = lean_decoder(model)
        assert isinstance(lean, LeanDecoder)
        logits = lean.prefill(ids, mask, max_new_tokens=7)
        for step in range(6):
            expected = hf_last_logits(model, ids, mask)
            assert (logits - expected).abs().max().item() < 1e-4, f"step {step}"
            tokens = torch.randint(3, 96, (ids.shape[0],), generator=g)
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if step == 2:
                keep = torch.tensor([0, 2])
                lean.keep_rows(keep)
                ids, mask, tokens = ids[keep], mask[keep], tokens[keep]
            logits = lean.step(tokens)


def test_gpt2_a_peft_model_and_other_rope_scalings_fall_back():
    from peft import LoraConfig, get_peft_model

    assert "GPT2LMHeadModel" in unsupported_reason(tiny_model("gpt2", vocab_size=64))
    llama = tiny_model("llama", vocab_size=64)
    assert unsupported_reason(llama) is None
    peft = get_peft_model(tiny_model("llama", vocab_size=64), LoraConfig(r=2, target_modules=["q_proj"]))
    assert unsupported_reason(peft) is not None and lean_decoder(peft) is None
    assert "not nn.Linear" in unsupported_reason(peft.get_base_model())  # the injected adapter layers
    scaled = tiny_model("llama", vocab_size=64)
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert "linear" in unsupported_reason(scaled)


def test_a_sliding_window_falls_back_only_when_a_sequence_can_outgrow_it():
    model = tiny_model("mistral", vocab_size=64, sliding_window=16)
    assert unsupported_reason(model, max_length=16) is None
    assert "sliding window" in unsupported_reason(model, max_length=17)
    assert lean_decoder(model, max_length=17) is None


def test_fp32_weights_are_used_in_place_and_bf16_gets_one_fused_copy():
    model = tiny_model("llama", vocab_size=64).eval()
    lean = LeanDecoder(model)
    attn = model.model.layers[0].self_attn
    assert not lean.layers[0].qkv.fused and lean.layers[0].qkv.parts[0][0].data_ptr() == attn.q_proj.weight.data_ptr()
    bf16 = LeanDecoder(model, torch.bfloat16)
    assert bf16.layers[0].qkv.fused and bf16.k_cache is None
    with torch.no_grad():
        bf16.prefill(*left_padded([[5, 6, 7], [8]]), max_new_tokens=2)
    assert bf16.k_cache.dtype == torch.bfloat16 and bf16.k_cache.shape == (2, 2, 2, 5, 16)


def test_the_decoder_is_kept_for_the_same_weights_and_rebuilt_when_they_change():
    """Sampling again on unchanged weights reuses the decoder (its fused / prepacked copies); an optimizer
    step, a loaded state dict or another dtype builds a new one, whose logits follow the new weights."""
    model = tiny_model("llama", vocab_size=96, seed=4, heads=4, layers=2).eval()
    ids, mask = left_padded([[5, 6, 7], [8, 9]])
    with torch.no_grad():
        first = lean_decoder(model, torch.bfloat16)
        assert lean_decoder(model, torch.bfloat16) is first
        assert lean_decoder(model, None) is not first and lean_decoder(model, torch.bfloat16, batch_hint=4) is not first
        before = lean_decoder(model).prefill(ids, mask, max_new_tokens=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    optimizer.step()  # in place: the parameters' version counters move
    model.eval()
    with torch.no_grad():
        after_step = lean_decoder(model)
        logits = after_step.prefill(ids, mask, max_new_tokens=2)
        assert (logits - hf_last_logits(model, ids, mask)).abs().max().item() < 1e-4
        assert (logits - before).abs().max().item() > 1e-3  # the new weights, not the kept copies
        kept = lean_decoder(model)
        assert kept is after_step
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        assert lean_decoder(model) is not kept


def test_prefill_groups_rows_of_similar_length_longest_first():
    """Lengths 9, 5, 3, 1 with at most 1.25 padded cells per real token: 9 alone (2 x 9 = 18 > 1.25 x 14),
    5 and 3 together (2 x 5 = 10 <= 1.25 x 8), 1 alone (3 x 5 = 15 > 1.25 x 9); row indices in batch order."""
    from preftune.model.fast_decode import prefill_groups

    assert prefill_groups([3, 9, 5, 1]) == [[1], [0, 2], [3]]
    assert prefill_groups([40, 38, 39, 40]) == [[0, 1, 2, 3]]  # similar lengths: one group, one forward
    assert prefill_groups([3, 9, 5, 1], waste=float("inf")) == [[0, 1, 2, 3]]


def test_grouped_prefill_equals_one_padded_prefill(monkeypatch):
    """A batch of a long prompt and short ones, prefilled in groups (each over its own columns, a group without
    padding on SDPA's causal path) and as one padded group: the same logits, then the same decode steps."""
    from preftune.model import fast_decode

    model = tiny_model("llama", vocab_size=96, seed=2, heads=4, layers=2).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = left_padded([torch.randint(3, 96, (n,), generator=g).tolist() for n in (30, 4, 5, 4, 12)])
    tokens = torch.randint(3, 96, (5,), generator=g)
    assert fast_decode.prefill_groups(mask.sum(-1).tolist()) == [[0], [4], [1, 2, 3]]  # 30 | 12 | 5, 4, 4
    runs = []
    with torch.no_grad():
        for waste in (fast_decode.PREFILL_WASTE, float("inf")):
            monkeypatch.setattr(fast_decode, "PREFILL_WASTE", waste)
            monkeypatch.setattr(fast_decode.prefill_groups, "__defaults__", (waste,))
            lean = LeanDecoder(model)
            runs.append((lean.prefill(ids, mask, max_new_tokens=3), lean.step(tokens), lean.step(tokens.flip(0))))
    for grouped, padded in zip(*runs):
        assert torch.allclose(grouped, padded, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotation_is_hugging_faces_rotate_half_bit_for_bit(dtype):
    """``x * cos + roll(x) * signed_sin`` (the sign carried by the table) equals Llama's
    ``x * cos + rotate_half(x) * sin`` exactly, in float32 and in bf16."""
    from transformers.models.llama.modeling_llama import rotate_half

    model = tiny_model("llama", seed=0)
    lean = LeanDecoder(model, dtype)
    lean._rotary_table(40)
    positions = torch.randint(0, 40, (3, 5))
    x = torch.randn(3, 5, 6, lean.head_dim).to(dtype)
    cos, signed_sin = lean.cos[positions].unsqueeze(2), lean.signed_sin[positions].unsqueeze(2)
    half = lean.head_dim // 2
    sin = torch.cat((-signed_sin[..., :half], signed_sin[..., half:]), dim=-1)
    assert torch.equal(lean._rotate(x, cos, signed_sin), x * cos + rotate_half(x) * sin)
