"""A lexicon sentiment judge for real English film reviews: ``python:preftune.recipes.sentiment:review_sentiment``.

:func:`preftune.recipes.quickstart_world.sentiment_score` knows the 32 words of the quickstart's generated
world; on reviews a real model writes ("a captivating tale with stunning visuals") it finds no
word and ties at 0 most of the time, which leaves best-vs-worst pairing nothing to choose from.
This judge has a few hundred common review words of each polarity and handles simple negation
("not good", "wasn't boring", "nothing special"). It stays a pure, transparent function: the
same text always gets the same score, and the formula is one line (see :func:`review_sentiment`).

The word lists are hand-picked for film reviews: words that are positive or negative in nearly
every review sentence they appear in. Ambiguous words ("like", "well", "better", "plot",
"dark", "simple", "long") are left out on purpose.
"""

from __future__ import annotations

import re

POSITIVE_WORDS = frozenset("""
absorbing accomplished acclaimed admirable adorable adventurous affecting amazing amazed amusing
appealing applause astonishing astounding atmospheric attractive audacious authentic awesome
beautiful beautifully beauty best bliss blissful bold breathtaking bright brilliance brilliant
brilliantly captivated captivating captivates celebrated charm charming charismatic cheerful
classic clever compelling compassionate confident convincing creative crisp dazzling delicate
delight delighted delightful delightfully deft elegant elegantly emotional
empowering enchanting energetic engaging engrossing enjoy enjoyable enjoyed entertaining
enthralling epic excellent excellently exceptional excited exciting exhilarating exquisite
extraordinary fabulous fantastic fascinating faultless favorite favourite fine finest flawless
fresh fun funny gem genius gentle genuine glorious gorgeous graceful gracefully great greatest
gripping happy harmonious heartfelt heartwarming hilarious honest hopeful humane imaginative
impeccable impressed impressive incredible incredibly ingenious innovative insightful inspired
inspiring intelligent intriguing inventive joy joyful joyous likeable lively lovable
love loved lovely loves loving luminous magical magnificent marvelous marvellous masterful
masterfully masterpiece memorable mesmerizing mesmerising moving nuanced outstanding
passionate perfect perfectly phenomenal pleasant pleasing pleasure poetic poignant polished
powerful powerfully precise profound rich refreshing remarkable remarkably resonant rewarding
riveting satisfying sensational sensitive sharp sincere skilful skillful skillfully
smart soulful sparkling spectacular splendid stellar striking strong stunning stunningly
sublime subtle succeeds success successful superb superbly surprising suspenseful sweet
talented tender terrific thoughtful thrilling timeless touching treasure tremendous triumph
triumphant unforgettable uplifting vibrant vivid warm warmth well-crafted well-made winning
wise witty wonder wonderful wonderfully worth worthwhile worthy good nice decent solid special
recommend recommended must-see well-acted well-written liked admire admired praise praised beloved
iconic thrilled thrill enthusiasm enthusiastic action-packed boasts delivers endearing exceeds groundbreaking
immersive captivatingly underrated acclaim commendable impeccably enjoyably entertainingly flawlessly vividly
refreshingly spellbinding enthralled mesmerized awe awe-inspiring jaw-dropping unmissable must-watch top-notch
first-rate five-star highlight shines excels triumphs standout noteworthy layered well-paced seamless seamlessly
deliciously ambitious inspirational
""".split())

NEGATIVE_WORDS = frozenset("""
absurd abysmal amateurish annoying appalling atrocious awful awkward awkwardly bad badly bland
bloated bore bored boring botched careless cheap cheesy clichéd cliched cliche clumsy clunky
confused confusing contrived cringe cringeworthy crude cynical dated depressing
derivative dire disappoint disappointed disappointing disappointment disaster disastrous
disgusting dismal disjointed dreadful dreary drab dull dumb embarrassing empty exhausting
fail failed fails failure fake flat flawed flaws forced forgettable frustrating garbage gimmicky
grating hackneyed hated hateful hollow horrible horrendous horrid incoherent inept insipid
insufferable insulting irritating joyless lackluster lacklustre lacking lacks lame laughable
lazy lifeless listless lousy mediocre meandering mess messy mindless miscast misguided
monotonous mundane muddled nonsense obnoxious offensive overlong overrated painful pathetic
pointless poor poorly predictable preachy pretentious problematic repetitive ridiculous rubbish
shallow shoddy silly slog sloppy sluggish stale stiff stilted stupid sucks superficial
tasteless tedious terrible terribly thin tired tiresome trash trite twaddle ugly unbearable
unconvincing underwhelming uneven uninspired uninteresting unfunny unlikable unoriginal
unpleasant unwatchable vapid waste wasted weak weakest wooden worse worst worthless wretched hate
dislike disliked unfortunately lacked slow struggles struggled flop dud uninvolving unremarkable marred
gross shameful overblown inadequate foul underdeveloped undercooked half-baked convoluted plodding tepid
lukewarm uninspiring unimpressive jarring overwrought overacted overacting melodramatic heavy-handed ham-fisted
nonsensical letdown let-down misfire drags dragged tedium snooze unfocused generic formulaic clichés corny
""".split())

# A negator flips the first sentiment word after it when at most NEGATION_WINDOW words lie between
# them, unless a clause boundary (, . ; : ! ? or "but") comes first: "not good" -1, "not bad at all"
# +1, "wasn't very exciting" -1, "not long, but brilliant" +1.
NEGATORS = frozenset("""
not no never nor neither nothing none nobody hardly barely scarcely without cannot
""".split())
NEGATION_WINDOW = 3
_BOUNDARY_WORDS = frozenset({"but", "however", "although", "though", "yet"})
_NOT_ONLY = frozenset({"only", "just", "merely"})  # "not only good" / "not just good": no negation
_TOKEN = re.compile(r"[a-zé]+(?:['-][a-zé]+)*|[.,;:!?]")


def tokens(text: str) -> list[str]:
    """Lower-cased words (with inner apostrophes and hyphens: ``isn't``, ``well-made``) and the
    clause punctuation ``. , ; : ! ?``; curly apostrophes count as straight ones."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_negator(word: str) -> bool:
    return word in NEGATORS or word.endswith("n't")


def _word_polarity(word: str) -> int:
    if word in POSITIVE_WORDS:
        return 1
    if word in NEGATIVE_WORDS:
        return -1
    # A hyphenated word counts as its own listed form ("well-made") or else as its last part
    # ("over-long" is not listed, "beautifully-shot" reads "shot": 0).
    if "-" in word:
        return _word_polarity(word.rsplit("-", 1)[1])
    return 0


def counts(text: str) -> tuple[int, int]:
    """``(pos, neg)``: positive and negative sentiment words of ``text`` after negation flips."""
    pos = neg = 0
    negate_left = 0  # sentiment words within this many more words are flipped
    for token in tokens(text):
        if token in ".,;:!?" or token in _BOUNDARY_WORDS:
            negate_left = 0
        elif negate_left and token in _NOT_ONLY:
            negate_left = 0
        elif _is_negator(token):
            negate_left = NEGATION_WINDOW + 1
        elif polarity := _word_polarity(token):
            if negate_left:
                polarity = -polarity
            pos, neg = pos + (polarity > 0), neg + (polarity < 0)
            negate_left = 0
        elif negate_left:
            negate_left -= 1
    return pos, neg


def review_sentiment(prompt: str, response: str) -> float:
    """Lexicon sentiment of ``response`` in (-1, 1): ``(pos - neg) / (pos + neg + 1)``.

    ``pos`` / ``neg`` count the words of :data:`POSITIVE_WORDS` / :data:`NEGATIVE_WORDS` in the
    lower-cased response, a word counted with the opposite polarity when a negator (:data:`NEGATORS`
    or any ``...n't`` word) comes before it in the same clause with at most three words between them
    (only the first sentiment word after a negator is flipped; "not only" / "not just" negate nothing). So "great" is
    0.5, "great and moving" 0.67, "great but dull" 0, "not good" -0.5, "not bad at all" +0.5, and a
    response with no sentiment word 0. The prompt is ignored. The same formula as
    :func:`preftune.recipes.quickstart_world.sentiment_score`, with a lexicon for real reviews.
    """
    pos, neg = counts(response)
    return (pos - neg) / (pos + neg + 1)
