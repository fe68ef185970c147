"""The offline quickstart's generated world (:mod:`preftune.recipes.quickstart_world`): its judge and its data."""

from __future__ import annotations

import random

import pytest

from preftune.recipes import quickstart_world as world


@pytest.mark.parametrize("response, expected", [
    ("", 0.0),                                    # no words: 0 / 1
    ("It runs for two hours.", 0.0),              # no sentiment words
    ("Great.", 0.5),                              # (1 - 0) / (1 + 0 + 1)
    ("A great and lovely film.", 2 / 3),          # (2 - 0) / (2 + 0 + 1)
    ("Great acting, dull story.", 0.0),           # (1 - 1) / (1 + 1 + 1)
    ("DULL, dull and boring.", -0.75),            # case-insensitive: (0 - 3) / (0 + 3 + 1)
    ("Greatness is undull.", 0.0),                # whole words only
])
def test_sentiment_score_by_hand(response, expected):
    assert world.sentiment_score("any prompt", response) == pytest.approx(expected)


def test_word_lists_do_not_overlap():
    sentiment = set(world.POSITIVE_WORDS) | set(world.NEGATIVE_WORDS)
    assert not set(world.POSITIVE_WORDS) & set(world.NEGATIVE_WORDS)
    other = " ".join(world.ASPECTS + world.GENRES + world.PEOPLE + world.PLACES + world.TITLE_FIRST
                     + world.TITLE_SECOND + world.NEUTRAL_TEMPLATES + world.PROMPT_TEMPLATES).lower()
    assert not sentiment & set(other.replace(".", " ").replace(",", " ").split())


def test_held_out_films_are_disjoint_and_seeded():
    train, held_out = world.film_titles(48, seed=0)
    assert len(train) + len(held_out) == 256 and len(held_out) == 48
    assert not set(train) & set(held_out)
    assert world.film_titles(48, seed=0) == (train, held_out)
    assert world.film_titles(48, seed=1) != (train, held_out)
    texts = world.pretraining_texts(train, 500, seed=1) + [r["prompt"] for r in world.sft_rows(train, 500, seed=2)]
    assert not any(film in text for film in held_out for text in texts)
    with pytest.raises(ValueError, match="n_held_out"):
        world.film_titles(0)


def test_review_tone_sets_the_sentiment():
    rng = random.Random(0)
    assert all(world.sentiment_score("", world.review(rng, tone=1.0)) > 0 for _ in range(50))
    assert all(world.sentiment_score("", world.review(rng, tone=0.0)) < 0 for _ in range(50))


def test_sft_rows_hold_both_sentiments():
    rows = world.sft_rows(world.film_titles(48)[0], 400, seed=0)
    scores = [world.sentiment_score(r["prompt"], r["completion"]) for r in rows]
    assert 0.3 < sum(s > 0 for s in scores) / len(scores) < 0.7
    assert 0.3 < sum(s < 0 for s in scores) / len(scores) < 0.7
    assert all(r["prompt"].endswith("\nReview:") and r["completion"].startswith(" ") for r in rows)
    assert rows == world.sft_rows(world.film_titles(48)[0], 400, seed=0)
