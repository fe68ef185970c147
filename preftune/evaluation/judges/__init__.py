"""Judges: decide which of two replies to a prompt is better (a Python function, a reward model, an OpenAI-compatible endpoint)."""
