"""The memory policy: --gradient-checkpointing auto|on|off from an activation estimate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from preftune.config import TrainConfig
from preftune.data.records import TokenizedExample
from preftune.memory import activation_bytes_per_token, decide_checkpointing
from preftune.tiny import tiny_model
from preftune.train import train

from test_train import read_metrics, rule_config


def test_activation_estimate_hand_computed():
    """SmolLM2-135M's shape: 30 layers x (12 x 576 x 4 B + 5 x 1536 x 4 B) = 30 x 58,368 B = 1,751,040 B
    per token in fp32; under bf16 autocast the MLP-width terms are 2 B: 30 x (27,648 + 15,360) = 1,290,240."""
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152)
    assert activation_bytes_per_token(config, None, torch.float32) == 1_751_040
    assert activation_bytes_per_token(config, torch.bfloat16, torch.float32) == 1_290_240


def _examples(lengths):
    return [TokenizedExample(index=i, prompt_ids=[5] * p, completions=[[6] * c, [7] * c])
            for i, (p, c) in enumerate(lengths)]


def test_auto_turns_checkpointing_on_only_over_the_budget():
    model = tiny_model("llama", vocab_size=64, seed=0)
    per_token = activation_bytes_per_token(model.config, None, torch.float32)
    examples = _examples([(10, 5), (20, 10), (4, 2)])  # packed tokens: 20, 40, 8
    batches = [[0, 1], [2]]
    longest = 60  # batch [0, 1], packed
    cfg = TrainConfig(batch_size=2, gradient_checkpointing="auto", activation_budget=longest * per_token / 2**30 * 1.01)
    on, why = decide_checkpointing(cfg, model, examples, batches, True, torch.device("cpu"), None)
    assert not on and f"({longest} tokens" in why and "fit --activation-budget" in why
    cfg.activation_budget = longest * per_token / 2**30 * 0.99
    on, why = decide_checkpointing(cfg, model, examples, batches, True, torch.device("cpu"), None)
    assert on and "exceed" in why
    # padded: the prompt is run once per completion: 2 x 10 + 10 + 2 x 20 + 20 = 90 tokens
    on, why = decide_checkpointing(cfg, model, examples, batches, False, torch.device("cpu"), None)
    assert "(90 tokens" in why
    for mode, expected in (("on", 1), ("off", 0)):
        cfg.gradient_checkpointing = mode
        assert decide_checkpointing(cfg, model, examples, batches, True, torch.device("cpu"), None)[0] == expected


def test_selective_checkpointing_recomputes_as_few_layers_as_the_budget_allows():
    """Recomputing every n-th layer keeps (1 - 1/n) of the activations: est 10 GiB, budget 8 -> keep 0.8
    -> n = 1 / 0.2 = 5 (keeps 8.0); budget 6 -> n = int(2.5) = 2 (keeps 5); budget 2 -> n = 1 (all)."""
    from preftune.memory import layers_between_checkpoints

    assert layers_between_checkpoints(10, 12) == 0
    assert layers_between_checkpoints(10, 8) == 5
    assert layers_between_checkpoints(10, 6) == 2
    assert layers_between_checkpoints(10, 2) == 1


def test_checkpointing_changes_memory_not_the_numbers(tiny_model_dir, rule_data, tmp_path):
    """Recomputed activations (every layer, or every 2nd chosen by auto) give the same losses as kept ones
    (fp32, 1e-5)."""
    common = dict(max_steps=4, logging_steps=1, eval_data=None)
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "off", gradient_checkpointing="off", **common))
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "on", gradient_checkpointing="on", **common))
    off = [r["loss"] for r in read_metrics(tmp_path / "off")]
    on = [r["loss"] for r in read_metrics(tmp_path / "on")]
    assert len(on) == 4 and on == pytest.approx(off, abs=1e-5)
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["gradient_checkpointing"] == "every layer"
