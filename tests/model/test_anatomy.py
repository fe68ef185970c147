"""The model parts preftune reaches for: the causal LM inside a wrapper, its body, its text config."""

import pytest
import torch
from torch import nn

from preftune.model.anatomy import (
    attention_implementation,
    body,
    causal_lm,
    no_split_modules,
    sliding_layout,
    text_config,
    text_part,
)
from preftune.model.logprobs import LogProbModel
from preftune.model.tiny import tiny_model


def test_causal_lm_looks_through_wrappers():
    model = tiny_model("llama", vocab_size=64)
    assert causal_lm(model) is model
    assert causal_lm(LogProbModel(model)) is model
    with pytest.raises(ValueError, match="DDP-wrapped"):
        causal_lm(nn.DataParallel(model))


def test_causal_lm_of_a_peft_model_is_the_base_with_adapters():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", vocab_size=64)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert causal_lm(lora) is model


def test_body_text_config_and_layout():
    model = tiny_model("llama", vocab_size=64, attn_implementation="eager")
    assert body(model) is model.model
    hidden = body(model)(input_ids=torch.tensor([[3, 4, 5]])).last_hidden_state
    assert hidden.shape == (1, 3, model.config.hidden_size)
    assert text_config(model) is model.config and text_part(model.config) is model.config
    assert attention_implementation(model) == "eager"
    assert sliding_layout(model.config) == (None, None)
    assert no_split_modules(model) == ["LlamaDecoderLayer"]
    with pytest.raises(ValueError, match="cannot find the body"):
        body(nn.Linear(2, 2))


def test_sliding_layout():
    class Config:
        sliding_window = 8
        layer_types = ["full_attention", "sliding_attention"]

    assert sliding_layout(Config()) == (8, ["full_attention", "sliding_attention"])
    Config.layer_types = None
    assert sliding_layout(Config()) == (8, None)  # every layer slides
    Config.layer_types = ["full_attention"]
    assert sliding_layout(Config()) == (None, None)
    Config.use_sliding_window = False
    assert sliding_layout(Config()) == (None, None)
