"""The falling-chosen-likelihood warning (training.chosen_drift): the pure test on a metric history, the watch
over logged rows (once, with the numbers and the remedies), and a planted run where it fires."""

from __future__ import annotations

import logging
import math

import pytest

from preftune.training.chosen_drift import THRESHOLD, ChosenDriftWatch, chosen_drift
from preftune.training.metrics_log import MetricsLog


def test_fires_when_chosen_falls_past_the_threshold_while_margins_grow():
    """Chosen -40 -> -47 (a fall of 7 > 5 nats), margin 0.1 -> 1.2: fires; the first and last values decide."""
    assert chosen_drift([-40.0, -42.0, -47.0], [0.1, 0.5, 1.2])
    assert chosen_drift([-40.0, -30.0, -45.5], [0.3, 0.0, 0.4])


@pytest.mark.parametrize("chosen, margins", [
    ([-40.0, -42.0, -47.0], [1.2, 0.5, 0.1]),  # chosen falls, margins shrink
    ([-40.0, -38.0, -35.0], [0.1, 0.5, 1.2]),  # chosen rises
    ([-40.0, -45.0], [0.1, 1.2]),  # a fall of exactly the threshold
    ([-40.0], [0.1]),  # one row: nothing to compare
    ([], []),
])
def test_silent_otherwise(chosen, margins):
    assert THRESHOLD == 5.0
    assert not chosen_drift(chosen, margins)


def test_nan_rows_are_left_out_and_lengths_must_match():
    assert chosen_drift([math.nan, -40.0, -47.0, math.nan], [0.0, 0.1, 1.2, 5.0])
    with pytest.raises(ValueError, match="of one length"):
        chosen_drift([-40.0, -47.0], [0.1])


def test_the_watch_warns_once_with_the_numbers_and_the_remedies(caplog):
    watch = ChosenDriftWatch()
    rows = [{"step": 8, "loss": 0.6, "logps/chosen_vs_ref": -40.0, "rewards/margins": 0.1},
            {"step": 16, "loss": 0.5, "logps/chosen_vs_ref": -43.0, "rewards/margins": 0.4},
            {"step": 24, "loss": 0.4, "logps/chosen_vs_ref": -47.25, "rewards/margins": 1.2},
            {"step": 32, "loss": 0.3, "logps/chosen_vs_ref": -60.0, "rewards/margins": 2.0}]
    with caplog.at_level(logging.WARNING, logger="preftune"):
        drifts = [watch.see(row) for row in rows]
    assert drifts[:2] == [None, None] and drifts[3] is None
    assert drifts[2].source == "running" and drifts[2].chosen_now == -47.25
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0]
    assert "running chosen log-prob (vs the reference) fell from -40.00 to -47.25 (-7.25 nats) by step 24" in message
    assert "margin grew from 0.100 to 1.200" in message and "--sft-weight" in message and "--loss dpop" in message


def test_running_rows_are_read_against_the_reference_not_as_absolute_log_probs(caplog):
    """Each running row is another batch: a batch of longer responses has a far lower summed chosen log-prob
    with nothing moved. The watch reads the chosen log-prob minus the reference's on the batch's own rows, so
    such rows (chosen vs reference near 0) stay silent, and a run without a reference is not watched on them."""
    watch = ChosenDriftWatch()
    rows = [{"step": 1, "logps/chosen": -325.0, "logps/chosen_vs_ref": 0.0, "rewards/margins": 0.0},
            {"step": 2, "logps/chosen": -433.0, "logps/chosen_vs_ref": -0.4, "rewards/margins": 0.3},
            {"step": 3, "logps/chosen": -512.0, "rewards/margins": 0.6}]  # a row without a reference metric
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert [watch.see(row) for row in rows] == [None, None, None]
    assert not caplog.records


def test_the_watch_prefers_the_held_out_history(caplog):
    """Held-out rows (eval/...) say nothing wrong, the running rows would: the held-out history decides once it
    has two rows."""
    watch = ChosenDriftWatch()
    rows = [{"step": 0, "eval/logps/chosen": -40.0, "eval/rewards/margins": 0.0},
            {"step": 8, "logps/chosen_vs_ref": -0.5, "rewards/margins": 0.1},
            {"step": 16, "eval/logps/chosen": -39.0, "eval/rewards/margins": 0.5},
            {"step": 16, "logps/chosen_vs_ref": -10.0, "rewards/margins": 0.9},
            {"step": 24, "eval/logps/chosen": -46.0, "eval/rewards/margins": 0.8}]
    with caplog.at_level(logging.WARNING, logger="preftune"):
        drifts = [watch.see(row) for row in rows]
    assert drifts[:4] == [None] * 4
    assert drifts[4].source == "held-out" and drifts[4].chosen_before == -40.0
    assert "held-out chosen log-prob fell from -40.00 to -46.00" in caplog.records[-1].getMessage()


def test_the_metrics_log_shows_each_row_to_the_watch(tmp_path, caplog):
    metrics = MetricsLog(tmp_path)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        metrics.write({"step": 1, "logps/chosen_vs_ref": -0.1, "rewards/margins": 0.0})
        metrics.write({"step": 2, "logps/chosen_vs_ref": -10.0, "rewards/margins": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert metrics.chosen_drift.warned
    assert [r.getMessage() for r in caplog.records if "chosen log-prob (vs the reference) fell" in r.getMessage()]


def run_config(tiny_model_dir, rule_data, out, **overrides):
    from preftune.config.train_config import TrainConfig

    values = dict(model=str(tiny_model_dir), data=str(rule_data["train"]), output_dir=str(out), beta=0.1,
                  learning_rate=3e-3, batch_size=8, max_steps=8, max_length=64, max_prompt_length=32,
                  logging_steps=1, seed=0, progress=False, warmup_ratio=0.0, lr_scheduler="constant")
    values.update(overrides)
    return TrainConfig(**values)


def drift_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "log-prob (vs the reference) fell"
            in r.getMessage()]


def test_a_planted_run_warns_once_and_a_dpo_run_stays_silent(tiny_model_dir, rule_data, tmp_path, caplog):
    """apo_down lowers both likelihoods, the rejected more (D'Oosterlinck et al. 2024, eq. 8): chosen falls
    while the margin grows, the run's log says so once; DPO on the same steps keeps its chosen log-probs."""
    from preftune.training.loop import train

    with caplog.at_level(logging.WARNING, logger="preftune"):
        train(run_config(tiny_model_dir, rule_data, tmp_path / "down", loss="apo_down"))
    warnings = drift_warnings(caplog)
    assert len(warnings) == 1 and "--sft-weight" in warnings[0] and "dpop" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preftune"):
        train(run_config(tiny_model_dir, rule_data, tmp_path / "dpo", loss="dpo"))
    assert drift_warnings(caplog) == []
