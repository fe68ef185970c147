"""The ``python:`` judge: a Python function ``f(prompt: str, response: str) -> float`` scores each response.

Spec: ``python:module:function`` (an importable module) or ``python:path/to/file.py:function`` (a file,
loaded by path). Higher is better; two responses compare by their scores.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

from preftune.evaluation.judges.base import ScoringJudge, check_lengths, prompt_text


class PythonJudge(ScoringJudge):
    """Scores with a Python function ``f(prompt: str, response: str) -> float`` (higher is better).

    Message-list prompts reach the function as :func:`~preftune.evaluation.judges.base.prompt_text`.
    """

    spec_form = "python:module:function  (or python:path/to/file.py:function)"

    def __init__(self, function: Callable[[str, str], float], spec: str = ""):
        self.function = function
        self.spec = spec or f"python:{getattr(function, '__module__', '?')}:{getattr(function, '__name__', '?')}"

    @classmethod
    def from_spec(cls, spec: str, **options) -> "PythonJudge":
        """``python:module:function`` or ``python:path/to/file.py:function``."""
        return cls(load_function(spec.removeprefix("python:")), spec=spec, **options)

    def score(self, prompts, responses) -> list[float]:
        check_lengths(prompts=prompts, responses=responses)
        scores = []
        for prompt, response in zip(prompts, responses):
            value = self.function(prompt_text(prompt), response)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"judge {self.spec} returned {value!r}; it must return a number") from None
            if math.isnan(value):
                raise ValueError(f"judge {self.spec} returned NaN for response {response!r:.60}")
            scores.append(value)
        return scores


def load_function(target: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` -> the function object."""
    location, sep, name = target.rpartition(":")
    if not sep or not location or not name:
        raise ValueError(f"python judge spec needs MODULE:FUNCTION or FILE.py:FUNCTION, got {target!r}")
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location)
        if not path.is_file():
            raise ValueError(f"python judge file not found: {path}")
        module_name = f"preftune_judge_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so dataclasses/pickle inside the file work
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise ValueError(f"python judge: cannot import module {location!r}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"python judge: {location!r} has no function {name!r}")
    return function
