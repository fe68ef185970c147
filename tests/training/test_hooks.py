"""The loop's hooks (training.hooks): called for every micro-batch and step, and the run's numbers unchanged."""

from __future__ import annotations

import json

from preftune.config.train_config import TrainConfig
from preftune.training.hooks import StepStats, TrainHooks
from preftune.training.loop import train


def config(tiny_model_dir, rule_data, out, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_model_dir), data=str(rule_data["train"]), output_dir=str(out), loss="dpo",
                  beta=0.1, learning_rate=3e-3, batch_size=4, grad_accum=2, max_steps=3, max_length=64,
                  max_prompt_length=32, logging_steps=1, seed=0, progress=False, packing=True)
    values.update(overrides)
    return TrainConfig(**values)


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_hooks_see_every_micro_batch_and_step_and_change_nothing(tiny_model_dir, rule_data, tmp_path):
    batches, steps = [], []
    hooks = TrainHooks(on_batch=lambda examples, batch: batches.append((len(examples), batch.input_ids.shape)),
                       on_step=steps.append)
    result = train(config(tiny_model_dir, rule_data, tmp_path / "hooked"), hooks=hooks)
    assert result.steps == 3
    assert len(batches) == 3 * 2 and all(count == 4 for count, _ in batches)  # grad_accum 2, batch 4
    assert [s.step for s in steps] == [1, 2, 3] and all(isinstance(s, StepStats) for s in steps)
    for stats in steps:
        assert stats.pairs == 8 and stats.tokens > 0 and len(stats.losses) == 2 and not stats.skipped
        assert stats.seconds > 0 and stats.cpu_seconds >= 0 and stats.grad_norm > 0
        assert stats.gpu_peak_memory_gib is None or stats.gpu_peak_memory_gib > 0
    assert steps[0].started < steps[1].started < steps[2].started
    train(config(tiny_model_dir, rule_data, tmp_path / "plain"))
    assert losses(tmp_path / "hooked") == losses(tmp_path / "plain")
