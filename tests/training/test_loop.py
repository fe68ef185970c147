"""The training loop end to end on a tiny model and the synthetic rule task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config.train_config import TrainConfig
from preftune.training.loop import train


def rule_config(tiny_model_dir, rule_data, out, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_model_dir), data=str(rule_data["train"]), eval_data=str(rule_data["eval"]),
                  output_dir=str(out), loss="dpo", beta=0.1, learning_rate=3e-3, batch_size=8, epochs=1,
                  max_length=64, max_prompt_length=32, logging_steps=4, warmup_ratio=0.0, lr_scheduler="constant",
                  seed=0, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_rule(tiny_model_dir, rule_data, tmp_path):
    """256 pairs, 32 steps of 8: held-out reward accuracy goes from chance to >= 0.9."""
    result = train(rule_config(tiny_model_dir, rule_data, tmp_path / "run"))
    assert result.steps == 32
    assert result.eval_before["rewards/accuracies"] == 0.0  # policy == reference: all rewards 0, no wins
    assert result.eval_before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert result.eval_after["rewards/accuracies"] >= 0.9
    assert result.eval_after["rewards/margins"] > 0
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "pairs_per_second",
                "tokens_per_second"):
        assert key in train_rows[-1], key
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert any("eval/rewards/accuracies" in r for r in rows)
    assert (tmp_path / "run" / "config.yaml").exists()


def test_precompute_ref_gives_the_same_losses(tiny_model_dir, rule_data, tmp_path):
    """Cached reference log-probs drive exactly the same run as a live frozen copy (1e-5)."""
    common = dict(max_steps=6, logging_steps=1, eval_data=None)
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "live", **common))
    result = train(rule_config(tiny_model_dir, rule_data, tmp_path / "cached", precompute_ref=True, **common))
    live = [r["loss"] for r in read_metrics(tmp_path / "live")]
    cached = [r["loss"] for r in read_metrics(tmp_path / "cached")]
    assert len(live) == 6
    assert cached == pytest.approx(live, abs=1e-5)
    assert list((tmp_path / "cached" / "ref_cache").glob("ref-*.safetensors"))
    assert result.steps == 6


def test_saved_model_reloads_with_the_same_logits(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "run"
    cfg = rule_config(tiny_model_dir, rule_data, out, max_steps=3, eval_data=None)
    train(cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    trained = AutoModelForCausalLM.from_pretrained(out)  # same files, independent load
    with torch.no_grad():
        a = reloaded(ids).logits
        b = trained(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)  # training changed the weights


def test_in_memory_model_equals_saved_model(tiny_model_dir, rule_data, tmp_path, final_model):
    """The in-memory policy after training and the reloaded folder give identical logits."""
    out = tmp_path / "run"
    train(rule_config(tiny_model_dir, rule_data, out, max_steps=3, eval_data=None))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        in_memory = final_model["model"].eval()(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.allclose(in_memory, reloaded, atol=0, rtol=0)


@pytest.mark.parametrize("loss", ["ipo", "robust", "hinge"])
def test_other_dpo_family_losses_train(tiny_model_dir, rule_data, tmp_path, loss):
    overrides = {"label_smoothing": 0.1} if loss == "robust" else {}
    beta = 0.5 if loss == "ipo" else 0.1
    result = train(rule_config(tiny_model_dir, rule_data, tmp_path / loss, loss=loss, beta=beta, **overrides))
    assert result.eval_after["rewards/accuracies"] >= 0.9, result.eval_after


def test_packed_and_padded_runs_agree(tiny_model_dir, rule_data, tmp_path):
    """The same 4 steps with packed and padded batches: losses equal to 1e-4 (fp32)."""
    common = dict(max_steps=4, logging_steps=1, eval_data=None)
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "packed", packing=True, **common))
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "padded", packing=False, **common))
    packed = [r["loss"] for r in read_metrics(tmp_path / "packed")]
    padded = [r["loss"] for r in read_metrics(tmp_path / "padded")]
    assert packed == pytest.approx(padded, abs=1e-4)


def test_tensorboard_logs_the_same_scalars(tiny_model_dir, rule_data, tmp_path):
    """--tensorboard writes every metrics.jsonl scalar as a TensorBoard event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(rule_config(tiny_model_dir, rule_data, out, max_steps=2, logging_steps=1, tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "rewards/accuracies", "eval/rewards/accuracies", "learning_rate"} <= tags
    logged = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)


def test_skip_bad_records_warns_with_count_and_locations(tiny_model_dir, rule_data, tmp_path, caplog):
    lines = rule_data["train"].read_text().splitlines()[:40]
    lines[3] = "{not json"
    lines[7] = '{"chosen": "same", "rejected": "same"}'
    data = tmp_path / "dirty.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dirty.jsonl:4: "):
        train(rule_config(tiny_model_dir, rule_data, tmp_path / "strict", data=str(data), max_steps=1, eval_data=None))
    with caplog.at_level("WARNING", logger="preftune"):
        train(rule_config(tiny_model_dir, rule_data, tmp_path / "skip", data=str(data), max_steps=1, eval_data=None,
                          skip_bad_records=True))
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "bad record" in r.getMessage()]
    assert len(warning) == 1 and "skipped 2 bad record(s)" in warning[0]
    assert "dirty.jsonl:4" in warning[0] and "dirty.jsonl:8" in warning[0]


def test_reference_runs_before_the_policy_graph_is_built():
    """The reference forward must not stack on the policy's activations (peak memory)."""
    from preftune.model.logprobs import LogpOutput
    from preftune.training.step import batch_objective

    calls = []
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)

    class Reference:
        def logps(self, batch):
            calls.append("reference")
            return torch.tensor([-1.5, -1.5])

    def policy(batch):
        calls.append("policy")
        return LogpOutput(logps=logps, counts=torch.tensor([1, 1]), token_logps=logps)

    class OneGroup:
        num_groups, labels, margins, scores, completion_mask = 1, None, None, None, None

    loss, _ = batch_objective(TrainConfig(model="m", data="d", loss="dpo", beta=0.1), OneGroup(), policy, Reference())
    assert calls == ["reference", "policy"]
    assert loss.requires_grad


def test_constant_schedule_warms_up_first(tiny_model_dir, rule_data, tmp_path):
    """--lr-scheduler constant is constant *after* the warmup (configs/dpo.yaml relies on it; transformers'
    plain "constant" skips warmup): with lr 3e-3 and 2 warmup steps the steps run at 0, 1.5e-3, then 3e-3; the
    row of a step logs the rate after its scheduler update (as HF Trainer does): 1.5e-3, 3e-3, 3e-3, 3e-3."""
    train(rule_config(tiny_model_dir, rule_data, tmp_path / "run", max_steps=4, warmup_steps=2, logging_steps=1,
                      eval_data=None))
    rates = [r["learning_rate"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rates == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3])
