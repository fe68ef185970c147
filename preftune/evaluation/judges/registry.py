"""Build a judge from its spec string: ``KIND:REST``, the kind looked up in :data:`JUDGES`.

* ``python:module:function`` or ``python:path/to/file.py:function`` — a Python function
  ``f(prompt: str, response: str) -> float``; higher is better (:mod:`.python`).
* ``reward-model:PATH`` — a sequence-classification reward model (one label); the score is its
  logit on prompt + response (:mod:`.reward_model`).
* ``openai:URL#MODEL`` — an OpenAI-compatible chat-completions server asked pairwise, once in each
  order to cancel position bias (:mod:`.openai`).

A new kind of judge is a :class:`~preftune.evaluation.judges.base.Judge` subclass with ``spec_form``
and ``from_spec`` in its own module, and one row in :data:`JUDGES`.
"""

from __future__ import annotations

from preftune.common.text import suggest
from preftune.evaluation.judges.base import Judge
from preftune.evaluation.judges.openai import OpenAIJudge
from preftune.evaluation.judges.python import PythonJudge
from preftune.evaluation.judges.reward_model import RewardModelJudge

JUDGES: dict[str, type[Judge]] = {  # the spec's prefix -> the judge class that reads the rest
    "python": PythonJudge,
    "reward-model": RewardModelJudge,
    "openai": OpenAIJudge,
}


def spec_forms() -> list[str]:
    """Every accepted spec form, one line each, in :data:`JUDGES`' order."""
    return [judge.spec_form for judge in JUDGES.values()]


def make_judge(spec: str, **options) -> Judge:
    """Build a judge from its spec string; ``options`` go to the judge's constructor.

    Raises ValueError listing the accepted forms for anything else (and the closest known kind when
    the prefix looks misspelt).
    """
    if not isinstance(spec, str):
        raise ValueError(f"a judge spec must be a string, got {type(spec).__name__}")
    kind, sep, rest = spec.partition(":")
    if sep and rest and kind in JUDGES:
        return JUDGES[kind].from_spec(spec, **options)
    close = suggest(kind, JUDGES) if sep and kind not in JUDGES else []
    hint = f" (did you mean {close[0] + ':'!r}?)" if close else ""
    raise ValueError(f"unknown judge spec {spec!r}{hint}; use one of:\n  " + "\n  ".join(spec_forms()))
