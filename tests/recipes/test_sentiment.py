"""The real recipe's lexicon sentiment judge (:mod:`preftune.recipes.sentiment`): scores by hand, negation and
the word lists."""

from __future__ import annotations

import pytest

from preftune.evaluation.judges.python import PythonJudge
from preftune.recipes.sentiment import NEGATIVE_WORDS, POSITIVE_WORDS, counts, review_sentiment


@pytest.mark.parametrize("response, expected", [
    ("", 0.0),                                            # no words: 0 / (0 + 0 + 1)
    ("It runs for two hours.", 0.0),                      # no sentiment words
    ("Great.", 0.5),                                      # (1 - 0) / (1 + 0 + 1)
    ("A great and moving film.", 2 / 3),                  # (2 - 0) / (2 + 0 + 1)
    ("Great acting, but a dull story.", 0.0),             # (1 - 1) / (1 + 1 + 1)
    ("DULL, dull and boring.", -0.75),                    # case-insensitive: (0 - 3) / (0 + 3 + 1)
    ("Not good.", -0.5),                                  # good flipped: (0 - 1) / (0 + 1 + 1)
    ("It was not bad at all.", 0.5),                      # bad flipped: (1 - 0) / 2
    ("It wasn\u2019t very exciting.", -0.5),              # curly n't, one word between: flipped
    ("Not long, but brilliant.", 0.5),                    # the comma ends the negation: brilliant stays +
    ("Not only brilliant but moving.", 2 / 3),            # "not only" is no negation
    ("I don't think it was great.", -0.5),                # three words between "don't" and "great": flipped
    ("No, the story is great.", 0.5),                     # "No," then a new clause
    ("Nothing special, a stunning mess.", -1 / 4),        # special flipped, stunning +, mess -: (1 - 2) / 4
    ("A well-made, absorbing masterpiece!", 0.75),        # hyphenated listed word: (3 - 0) / 4
    ("Greatness is ungreat.", 0.0),                       # whole words only
])
def test_review_sentiment_by_hand(response, expected):
    assert review_sentiment("any prompt", response) == pytest.approx(expected)


def test_negation_flips_only_the_first_word_within_three():
    assert counts("not good and great") == (1, 1)                # good flipped, great not
    assert counts("not a b c good") == (0, 1)                    # three words between: flipped
    assert counts("not a b c d good") == (1, 0)                  # four words between: out of reach


def test_lexicon_is_broad_and_disjoint():
    assert len(POSITIVE_WORDS) >= 150 and len(NEGATIVE_WORDS) >= 150
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    judge = PythonJudge(review_sentiment)
    reviews = ["The Silent Harbor is a captivating tale with stunning visuals and a moving score.",
               "A dull, predictable film with wooden acting.", "The film follows a young doctor in Paris."]
    assert [round(s, 2) for s in judge.score(["p"] * 3, reviews)] == [0.75, -0.75, 0.0]
