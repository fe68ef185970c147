"""Recipes: the offline quickstart (a generated task) and the real-model recipe (SmolLM2 on two real tasks), end to end."""
