"""Recipes, end to end: the offline quickstart (a generated task) and the real-model recipe (SmolLM2 on two
real tasks), run stage by stage by the one stage runner they share (:mod:`preftune.recipes.stages`)."""
