"""compare's table (sweep_report.table_rows): the ranking and chosen-likelihood columns."""

from __future__ import annotations

from preftune.evaluation.sweep_report import TABLE_HEADER, render_markdown, table_rows


def summary(preference: dict) -> dict:
    row = {"name": "a", "options": {"loss": "dpo"}, "status": "done", "error": None, "train_seconds": 2.0,
           "peak_rss_mb": 300.0, "train_rss_mb": 50.0, "peak_gpu_mb": None,
           "evaluation": {"preference": preference, "nll": {"model": 2.0, "difference": 0.1}, "generation": None}}
    return {"title": "t", "base": "m", "data": "d", "eval_data": "e", "criterion_text": "c", "best_text": "b",
            "rows": [row]}


def test_table_shows_ranking_accuracy_tau_and_the_chosen_change():
    pref = {"accuracy": 0.75, "pairs": 40, "groups": 10, "ranking_accuracy": 0.75, "kendall_tau": 0.5125,
            "chosen_logp_change": -1.2346}
    (cells,) = table_rows(summary(pref))
    columns = dict(zip(TABLE_HEADER, cells))
    assert columns["ranking acc / Kendall tau"] == "0.750 / +0.512"
    assert columns["chosen logp change vs base"] == "-1.235"
    assert columns["held-out acc"] == "0.750"
    assert "| ranking acc / Kendall tau | chosen logp change vs base |" in render_markdown(summary(pref), {})


def test_table_without_the_ranking_metrics_says_na():
    """An evaluation without them (a failed variant, a result written before they existed, no base)."""
    (cells,) = table_rows(summary({"accuracy": 0.5, "pairs": 8}))
    assert cells[-2:] == ("n/a", "n/a")
    (cells,) = table_rows(summary({"accuracy": 0.5, "ranking_accuracy": 0.5, "kendall_tau": None,
                                   "chosen_logp_change": None}))
    assert cells[-2:] == ("0.500 / n/a", "n/a")
