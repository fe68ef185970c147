"""The packing decision is made by behaviour: a tiny packed forward against padded ones.

Accepted: every architecture whose packed log-probs match (tests/model/test_logprobs.py holds them to
1e-4 on real batches). Refused: a body that ignores our 4D mask (diff 0.28 nats on a tiny
random Llama), a body whose packed forward raises (Falcon with ALiBi builds its bias from a
2D mask), a mixed-layer body that cannot take the per-layer mask dict (Mistral's), and the
configurations ruled out without a forward (flash attention, GPT-Neo's column-windowed layers).
"""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FalconConfig, GPTNeoConfig, LlamaModel

from preftune.data.collate import collate_packed
from preftune.data.records import TokenizedExample
from preftune.model import packing as packing_check
from preftune.model.masks import build_packed_mask, packed_attention_mask
from preftune.model.packing import forget_packing_verdict, probe_tolerance, supports_packing
from preftune.model.tiny import tiny_model

VOCAB = 512
MIXED_QWEN2 = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention"])


def model_for(arch, attn="sdpa", **config):
    return tiny_model(arch, vocab_size=VOCAB, attn_implementation=attn, **config)


def from_config(config, attn="eager"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def count_body_forwards(model):
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    return calls


class MaskIgnoringLlamaModel(LlamaModel):
    """Drops the attention mask: builds its own plain causal mask, as a refactored body might."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=None, position_ids=position_ids, **kwargs)


class MaskRejectingLlamaModel(LlamaModel):
    """Takes 2D padding masks only: the packed forward raises."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("only 2D padding masks are supported\nsecond line")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def with_body(body_class, attn="sdpa"):
    model = model_for("llama", attn)
    model.model.__class__ = body_class  # same weights, the causal LM now runs this body
    return model


# ----------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("arch,config", [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", dict(sliding_window=4)),  # the window bites inside the probe: folded into our mask
    ("gpt2", {}),  # absolute position embeddings
])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_accepts(arch, config, attn):
    ok, why = supports_packing(model_for(arch, attn, **config))
    assert ok, why
    assert why.startswith("packed probe forward matched separate forwards (max |diff| ")
    assert f"float32 {attn}" in why


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mixed_layers_pass_the_per_layer_mask_dict(attn):
    model = model_for("qwen2", attn, **MIXED_QWEN2)
    ok, why = supports_packing(model)
    assert ok and "with the per-layer-type mask dict matched" in why
    ok, why = supports_packing(model, max_length=8)
    assert ok and why.startswith("every sequence fits in the sliding window (8 <= 8)")


def test_half_precision_tolerance():
    assert probe_tolerance(torch.float32) == 1e-4
    assert probe_tolerance(torch.float16) == pytest.approx(16 * 2**-10)
    assert probe_tolerance(torch.bfloat16) == pytest.approx(16 * 2**-7)
    ok, why = supports_packing(model_for("llama").to(torch.bfloat16))
    assert ok and "tolerance 0.12 for bfloat16 sdpa" in why
    ok, why = supports_packing(with_body(MaskIgnoringLlamaModel).to(torch.bfloat16))
    assert not ok, why  # the ignored mask still shows above the looser bf16 tolerance


def test_peft_model_and_training_flags_restored():
    peft = pytest.importorskip("peft")
    model = model_for("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
                                                      init_lora_weights=False))
    lora.train()
    frozen = model.model.layers[0].mlp
    frozen.eval()  # a module the caller keeps in eval mode stays there
    ok, why = supports_packing(lora)
    assert ok, why  # lora_dropout 0.5: would differ between the forwards if the probe ran in train mode
    assert model.training and model.model.layers[1].training and not frozen.training


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_refuses_a_body_that_ignores_the_mask(attn):
    ok, why = supports_packing(with_body(MaskIgnoringLlamaModel, attn))
    assert not ok
    assert why.startswith("packed probe forward of MaskIgnoringLlamaModel differs from separate forwards")
    assert "does not honour a custom 4D attention mask" in why


def test_refuses_a_body_whose_packed_forward_raises():
    ok, why = supports_packing(with_body(MaskRejectingLlamaModel))
    assert not ok
    assert why == ("packed probe forward of MaskRejectingLlamaModel raised "
                   "ValueError: only 2D padding masks are supported")


def test_refuses_falcon_with_alibi():
    """A real architecture: Falcon's ALiBi bias is built from a 2D mask, a packed 4D one raises."""
    config = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    ok, why = supports_packing(from_config(config))
    assert not ok and why.startswith("packed probe forward of FalconModel raised ValueError")
    config.alibi = False  # rotary Falcon is fine
    assert supports_packing(from_config(config))[0]


def test_refuses_a_mixed_body_without_the_per_layer_dict():
    """Mistral's body builds one mask for all layers: with mixed layer types it cannot take a dict,
    which is only needed once a sequence is longer than the window."""
    model = model_for("mistral", sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    ok, why = supports_packing(model)
    assert not ok and why.startswith("packed probe forward of MistralModel with the per-layer-type mask dict raised")
    ok, why = supports_packing(model, max_length=8)
    assert ok and why.startswith("every sequence fits in the sliding window (8 <= 8): packed probe forward matched")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "sdpa_paged"])
def test_refuses_attention_without_custom_masks_before_any_forward(impl):
    model = model_for("llama")
    model.config._attn_implementation = impl
    calls = count_body_forwards(model)
    ok, why = supports_packing(model)
    assert not ok and why.startswith(f"attention {impl!r} cannot take a custom attention mask")
    assert not calls


def test_refuses_gpt_neo_local_layers():
    """GPT-Neo windows its local layers by column (256): a packed row breaks it beyond the window,
    which a short probe never reaches, so the config refuses. With a window inside the probe
    the probe alone refuses too."""
    config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, window_size=8,
                          attention_types=[[["global", "local"], 1]])
    ok, why = supports_packing(from_config(config))
    assert not ok and why.startswith("layer types ['local'] are not supported by packing")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing_check, "_KNOWN_LAYER_TYPES", packing_check._KNOWN_LAYER_TYPES | {"local"})
        ok, why = supports_packing(from_config(config))
    assert not ok and "GPTNeoModel differs from separate forwards" in why


# ----------------------------------------------------------------------------- cache


def test_probe_runs_once_per_model_and_attention():
    model = model_for("llama")
    calls = count_body_forwards(model)
    first = supports_packing(model)
    for max_length in (None, 5, 10_000):
        assert supports_packing(model, max_length) == first
    assert len(calls) == 2  # one padded, one packed forward
    model.config._attn_implementation = "eager"  # the verdict depends on the attention: probed again
    assert supports_packing(model)[0] and len(calls) == 4
    model.config._attn_implementation = "sdpa"
    assert supports_packing(model) == first and len(calls) == 4
    forget_packing_verdict(model)
    assert supports_packing(model) == first and len(calls) == 6
    assert supports_packing(with_body(MaskIgnoringLlamaModel))[0] is False  # per model object, not per class


# ----------------------------------------------------------------------------- the mask the probe builds


def long_examples():
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return [TokenizedExample(index=0, prompt_ids=ids(3), completions=[ids(12), ids(2)]),
            TokenizedExample(index=1, prompt_ids=ids(6), completions=[ids(1), ids(9)])]


@pytest.mark.parametrize("arch,attn,config", [
    ("llama", "eager", {}),
    ("mistral", "sdpa", dict(sliding_window=8)),
    ("qwen2", "eager", MIXED_QWEN2),
])
def test_build_packed_mask_matches_packed_attention_mask(arch, attn, config):
    model = model_for(arch, attn, **config)
    batch = collate_packed(long_examples(), 0, pack_tokens=10_000)
    built, expected = build_packed_mask(model, batch), packed_attention_mask(model, batch)
    if isinstance(expected, dict):
        assert built.keys() == expected.keys()
        assert all(torch.equal(built[k], expected[k]) for k in expected)
    else:
        assert torch.equal(built, expected)


def test_build_packed_mask_forced_dict():
    model = model_for("qwen2", **MIXED_QWEN2)
    batch = collate_packed(long_examples()[:1], 0)  # longest sequence 15 > window 8
    short = collate_packed([TokenizedExample(index=0, prompt_ids=[5, 6], completions=[[7, 8], [9]])], 0)
    assert isinstance(build_packed_mask(model, batch), dict)
    assert isinstance(build_packed_mask(model, short), torch.Tensor)  # the window never bites
    forced = build_packed_mask(model, short, layer_dict=True)
    assert torch.equal(forced["full_attention"], forced["sliding_attention"])
    assert not isinstance(build_packed_mask(model_for("llama"), short, layer_dict=True), dict)  # not mixed


def test_probe_examples_fit_the_vocabulary_and_the_window():
    model = tiny_model("llama", vocab_size=8)  # ids 3..7 only: pad 0, bos 1, eos 2 excluded
    examples = packing_check._probe_examples(model, longest=4)
    for ex in examples:
        assert all(3 <= i < 8 for i in ex.prompt_ids + [t for c in ex.completions for t in c])
        assert max(len(ex.prompt_ids) + len(c) for c in ex.completions) <= 4
        assert ex.prompt_ids and all(ex.completions)


def test_no_probe_through_an_unwrapped_ddp_model():
    with pytest.raises(ValueError, match="DDP-wrapped"):
        supports_packing(nn.DataParallel(model_for("llama")))


# ----------------------------------------------------------------------------- decided once, where the batches are built


def test_batches_run_no_probe_and_a_recorded_refusal_raises():
    """batch_logps never probes: the decision is the one supports_packing recorded on the model."""
    from preftune.model.logprobs import batch_logps

    model = with_body(MaskIgnoringLlamaModel)
    calls = count_body_forwards(model)
    batch = collate_packed(long_examples(), 0)
    batch_logps(model, batch)  # never asked: nothing recorded, the batch runs (the caller decided)
    assert len(calls) == 1
    ok, why = supports_packing(model)
    assert not ok and len(calls) == 3
    with pytest.raises(ValueError, match="cannot run a packed batch: packed probe forward"):
        batch_logps(model, batch)
    with pytest.raises(ValueError, match="cannot run a packed batch"):
        packed_attention_mask(model, batch)
    assert len(calls) == 3  # no probe on either
    forget_packing_verdict(model)  # the decision goes with the verdicts
    batch_logps(model, batch)


def test_packing_decision_covers_every_model():
    good, bad = model_for("llama"), with_body(MaskIgnoringLlamaModel)
    assert packing_check.packing_decision(good, None) == supports_packing(good)
    ok, why = packing_check.packing_decision(good, bad)
    assert not ok and why == supports_packing(bad)[1]
    with pytest.raises(ValueError, match="cannot run a packed batch"):
        packed_attention_mask(bad, collate_packed(long_examples(), 0))


def test_collate_builders_take_plain_values():
    examples = long_examples()
    packed = packing_check.make_collate(0, True, pack_tokens=10_000, train_on_prompt=True)(examples)
    padded = packing_check.make_collate(0, False, pack_tokens=10_000, train_on_prompt=True)(examples)
    assert packed.packed and packed.input_ids.shape[0] == 1 and not padded.packed
    assert torch.equal(packed.token_targets, padded.token_targets)  # prompt tokens scored in both
    model = model_for("llama")
    assert packing_check.model_row_cost(model) > 0
    assert packing_check.scoring_collate(model, 0)(examples).packed
    assert not packing_check.scoring_collate(model, 0, packing=False)(examples).packed
    assert not packing_check.scoring_collate(with_body(MaskIgnoringLlamaModel), 0)(examples).packed
