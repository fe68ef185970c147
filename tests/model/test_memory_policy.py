"""The memory policy: --gradient-checkpointing auto|on|off from an activation estimate."""

from __future__ import annotations

import json

import pytest
import torch
from training.test_loop import read_metrics, rule_config
from transformers import LlamaConfig

from preftune.config.train_config import TrainConfig
from preftune.data.records import TokenizedExample
from preftune.model.memory_policy import activation_bytes_per_token, plan_memory
from preftune.model.tiny import tiny_model
from preftune.training.loop import train


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
    plan = plan_memory(cfg, model, examples, batches, True, torch.device("cpu"), None)
    on, why = plan.every_n_layers, plan.why
    assert not on and f"({longest} tokens" in why and "fit --activation-budget" in why
    cfg.activation_budget = longest * per_token / 2**30 * 0.99
    plan = plan_memory(cfg, model, examples, batches, True, torch.device("cpu"), None)
    on, why = plan.every_n_layers, plan.why
    assert on and "exceed" in why
    # padded: the prompt is run once per completion: 2 x 10 + 10 + 2 x 20 + 20 = 90 tokens
    assert "(90 tokens" in plan_memory(cfg, model, examples, batches, False, torch.device("cpu"), None).why
    for mode, expected in (("on", 1), ("off", 0)):
        cfg.gradient_checkpointing = mode
        assert plan_memory(cfg, model, examples, batches, True, torch.device("cpu"), None).every_n_layers == expected


def test_selective_checkpointing_recomputes_as_few_layers_as_the_budget_allows():
    """Recomputing every n-th layer keeps (1 - 1/n) of the activations: est 10 GiB, budget 8 -> keep 0.8
    -> n = 1 / 0.2 = 5 (keeps 8.0); budget 6 -> n = int(2.5) = 2 (keeps 5); budget 2 -> n = 1 (all)."""
    from preftune.model.memory_policy import layers_between_checkpoints

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


def test_default_budget_is_half_the_fixed_memory_with_a_floor_and_a_ceiling(monkeypatch):
    """Budget = max(half of weights + gradients + AdamW moments + reference, 1 GiB), at most a quarter of the
    available memory: 6 GiB fixed -> 3 GiB; 1 GiB fixed -> the 1 GiB floor; 6 GiB fixed with 8 GiB available
    -> 2 GiB."""
    import preftune.model.memory_policy as memory

    gib = 2 ** 30
    cfg = TrainConfig()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 40 * gib)
    assert memory._budget(cfg, torch.device("cpu"), 6 * gib)[0] == 3 * gib
    assert memory._budget(cfg, torch.device("cpu"), 1 * gib)[0] == 1 * gib
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 8 * gib)
    budget, source = memory._budget(cfg, torch.device("cpu"), 6 * gib)
    assert budget == 2 * gib and "quarter of the 8.0 GiB" in source


def test_training_state_counts_gradients_and_adamw_moments():
    """A trained fp32 parameter costs 4 x 4 B (weight, gradient, two moments), a frozen one 4 B, and
    the reference copy 4 B per parameter: n trained + n frozen copy = 20 n bytes."""
    from preftune.model.memory_policy import training_state_bytes

    model = tiny_model("llama", vocab_size=64, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert training_state_bytes(model, tiny_model("llama", vocab_size=64, seed=1)) == 20 * n
    model.requires_grad_(False)
    assert training_state_bytes(model) == 4 * n


def test_head_cache_gets_what_the_body_leaves():
    """Checkpointing every layer keeps (about) nothing of the body, so the head's softmax may use the whole
    --activation-budget (here 1 MiB, below the 512 MiB cap); the batch's 3 x 2 x 5 = 30 completion tokens x 64
    vocab x 4 B = 7,680 B fit. With a 1 KiB budget they don't, and the log says the head recomputes."""
    model = tiny_model("llama", vocab_size=64, seed=0)
    examples = _examples([(10, 5), (20, 5), (4, 5)])
    cfg = TrainConfig(batch_size=3, gradient_checkpointing="on", activation_budget=2 ** 20 / 2 ** 30)
    plan = plan_memory(cfg, model, examples, [[0, 1, 2]], True, torch.device("cpu"), None)
    assert plan.every_n_layers == 1 and plan.head_cache_bytes == 2 ** 20 and "recomputed" not in plan.why
    cfg.activation_budget = 1024 / 2 ** 30
    plan = plan_memory(cfg, model, examples, [[0, 1, 2]], True, torch.device("cpu"), None)
    assert plan.head_cache_bytes == 1024 and "(30 completion tokens x 64 = 0.00 GiB) is recomputed" in plan.why
    cfg.gradient_checkpointing = "off"  # the user chose speed: the head keeps its full cache
    assert plan_memory(cfg, model, examples, [[0, 1, 2]], True, torch.device("cpu"), None).head_cache_bytes == 2 ** 29
