"""Evaluation: a trained model against its base (held-out preferences, NLL, KL, judged win rate), sampling, judges, metrics, and sweeps of variants with their report."""
