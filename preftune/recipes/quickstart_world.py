"""The quickstart's generated world: film titles, review templates, word lists, and the judge.

Everything the quickstart trains on is written here from templates with a seeded
``random.Random``, so the same seed always gives the same corpus, and nothing is downloaded.

* :func:`film_titles` — every title ("The Silent Harbor"), split into training and held-out films.
* :func:`review` — one review of a chosen *tone* (the chance that each opinion is positive).
* :func:`pretraining_texts` — plain text: a film magazine's reviews and listings (no instruction format).
* :func:`sft_rows` — ``{"prompt", "completion"}`` rows: "Write a review of <film>." -> a review whose
  tone is drawn uniformly, so the SFT model writes positive, negative and mixed reviews.
* :func:`sentiment_score` — the built-in judge, a lexicon scorer
  (``python:preftune.recipes.quickstart_world:sentiment_score``).

The measurable preference follows the controlled-sentiment task of the DPO paper (Rafailov et al.
2023, section 6.1): the policy should write *positive* reviews, and a fixed scorer says how positive.
"""

from __future__ import annotations

import random
import re

# ----------------------------------------------------------------------------- word lists

POSITIVE_WORDS = (
    "wonderful", "brilliant", "moving", "beautiful", "charming", "superb", "delightful", "gripping",
    "clever", "funny", "stunning", "excellent", "great", "memorable", "fresh", "lovely",
)
NEGATIVE_WORDS = (
    "boring", "dull", "awful", "terrible", "clumsy", "tedious", "bland", "messy",
    "weak", "silly", "flat", "forgettable", "painful", "lazy", "poor", "stale",
)
ASPECTS = ("acting", "story", "music", "ending", "script", "cast", "camera work", "dialogue",
           "pacing", "lead actor", "soundtrack", "direction", "editing", "humour", "final act")
GENRES = ("drama", "comedy", "thriller", "western", "musical", "mystery", "romance", "war film")
PEOPLE = ("a young doctor", "an old sailor", "a tired detective", "two sisters", "a teacher", "a small family",
          "a jazz singer", "a lonely farmer", "a retired boxer", "a group of friends")
PLACES = ("Paris", "a small town", "the mountains", "a big city", "an island", "the desert", "Berlin",
          "a fishing village", "the north", "Rome")
TITLE_FIRST = ("Silent", "Broken", "Golden", "Last", "Hidden", "Midnight", "Crimson", "Distant",
               "Frozen", "Wild", "Lost", "Electric", "Quiet", "Burning", "Paper", "Iron")
TITLE_SECOND = ("River", "Harbor", "Garden", "Empire", "Signal", "Summer", "Mirror", "Station",
                "Orchard", "Kingdom", "Letter", "Horizon", "Bridge", "Winter", "Circus", "Lighthouse")

# Opinion sentences: {w} (and {w2}) are sentiment words of the same polarity.
OPINION_TEMPLATES = (
    "The {aspect} is {w}.",
    "I found the {aspect} {w}.",
    "What a {w} {genre}.",
    "The {aspect} was {w} and the {aspect2} was {w2}.",
    "It is a {w} film.",
    "Overall, {w}.",
    "The {aspect} felt {w}.",
    "A {w} and {w2} {genre}.",
)
# Sentences with no opinion at all.
NEUTRAL_TEMPLATES = (
    "The story follows {person} in {place}.",
    "It is a {genre} set in {place}.",
    "It runs for two hours.",
    "I saw it last week.",
    "The film is about {person}.",
)
PROMPT_TEMPLATES = (
    "Write a review of {title}.",
    "What did you think of {title}?",
    "Review the film {title}.",
)


def prompt_text(title: str, template: int = 0) -> str:
    """The instruction for ``title`` in plain-text format; the review follows after ``Review:``."""
    return PROMPT_TEMPLATES[template].format(title=title) + "\nReview:"


# ----------------------------------------------------------------------------- films and reviews


def film_titles(n_held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training_films, held_out_films)``: all 256 "The <first> <second>" titles, shuffled and split.

    Held-out films appear in no pretraining text, SFT row or DPO pair.
    """
    titles = [f"The {a} {b}" for a in TITLE_FIRST for b in TITLE_SECOND]
    if not 0 < n_held_out < len(titles):
        raise ValueError(f"n_held_out must be in 1..{len(titles) - 1}, got {n_held_out}")
    random.Random(seed).shuffle(titles)
    return titles[n_held_out:], titles[:n_held_out]


def opinion(rng: random.Random, positive: bool) -> str:
    """One opinion sentence, all of whose sentiment words are positive (or all negative)."""
    words = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    first, second = rng.sample(words, 2)
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    return rng.choice(OPINION_TEMPLATES).format(w=first, w2=second, aspect=aspect, aspect2=aspect2,
                                               genre=rng.choice(GENRES))


def neutral(rng: random.Random) -> str:
    return rng.choice(NEUTRAL_TEMPLATES).format(person=rng.choice(PEOPLE), place=rng.choice(PLACES),
                                               genre=rng.choice(GENRES))


def review(rng: random.Random, tone: float) -> str:
    """A review of 2-4 sentences: one neutral sentence at most, each opinion positive with probability ``tone``."""
    n_opinions = rng.randint(1, 3)
    sentences = [opinion(rng, rng.random() < tone) for _ in range(n_opinions)]
    if rng.random() < 0.6:
        sentences.insert(rng.randint(0, 1), neutral(rng))
    elif n_opinions == 1:
        sentences.append(opinion(rng, rng.random() < tone))
    return " ".join(sentences)


def sft_rows(films: list[str], n: int, seed: int) -> list[dict]:
    """``n`` instruction rows ``{"prompt", "completion"}`` over ``films``; tones uniform in [0, 1]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = prompt_text(rng.choice(films), rng.randrange(len(PROMPT_TEMPLATES)))
        rows.append({"prompt": prompt, "completion": " " + review(rng, rng.random())})
    return rows


def pretraining_texts(films: list[str], n: int, seed: int) -> list[str]:
    """``n`` plain texts in a film magazine's voice: reviews headed by their film, and short listings."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        title = rng.choice(films)
        if rng.random() < 0.8:
            texts.append(f"{title}. {review(rng, rng.random())}")
        else:
            texts.append(f"Now showing: {title}, a {rng.choice(GENRES)} about {rng.choice(PEOPLE)} "
                         f"in {rng.choice(PLACES)}.")
    return texts


def tokenizer_corpus(films: list[str]) -> list[str]:
    """Text for the BPE tokenizer: every word of the world once, plus some generated reviews.

    ``films`` should be *all* titles (held-out ones included) so their words are whole tokens.
    """
    vocabulary = (POSITIVE_WORDS + NEGATIVE_WORDS + ASPECTS + GENRES + PEOPLE + PLACES + TITLE_FIRST
                  + TITLE_SECOND)
    rows = sft_rows(films, 2000, seed=12345)
    return [" ".join(vocabulary), *films, *(r["prompt"] + r["completion"] for r in rows)]


# ----------------------------------------------------------------------------- the judge

_WORD = re.compile(r"[a-z]+")
_POSITIVE, _NEGATIVE = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS)


def sentiment_score(prompt: str, response: str) -> float:
    """Lexicon sentiment of ``response`` in (-1, 1): ``(pos - neg) / (pos + neg + 1)``.

    +1 per positive word and -1 per negative word (whole lower-cased words of the lists above),
    normalised so the sign is the net sentiment and the size grows with how many sentiment words
    agree: "great" 0.5, "great and lovely" 0.67, "great but dull" 0, no sentiment words 0.
    The prompt is ignored. Usable as a judge: ``python:preftune.recipes.quickstart_world:sentiment_score``.
    """
    words = _WORD.findall(response.lower())
    pos = sum(w in _POSITIVE for w in words)
    neg = sum(w in _NEGATIVE for w in words)
    return (pos - neg) / (pos + neg + 1)
