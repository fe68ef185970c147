"""Judges: who wrote the better response, "a" or "b"?

Build one from a spec string with :func:`make_judge`:

* ``python:module:function`` or ``python:path/to/file.py:function`` — a Python function
  ``f(prompt: str, response: str) -> float``; higher is better.
* ``reward-model:PATH`` — a sequence-classification reward model (one label); the score
  is its logit on prompt + response.
* ``openai:URL#MODEL`` — an OpenAI-compatible chat-completions server asked pairwise,
  once in each order to cancel position bias (:class:`preftune.evaluation.judges.openai.OpenAIJudge`).

Every judge has ``compare(prompts, responses_a, responses_b) -> CompareResult`` with one
outcome per item: 1 (a wins), 0 (b wins), 0.5 (tie). The first two kinds are *scoring*
judges: they also have ``score(prompts, responses) -> list[float]`` and compare by score
(equal scores tie). Prompts are plain strings or chat message lists
(``[{"role": ..., "content": ...}]``); see :func:`prompt_text`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from preftune.data.messages import is_messages, messages_text
from preftune.evaluation.metrics import LOSS, TIE, WIN, WinRate, win_rate

log = logging.getLogger("preftune")

Prompt = Union[str, list]  # plain text, or a list of {"role", "content"} messages

SPEC_FORMS = ("python:module:function  (or python:path/to/file.py:function)",
              "reward-model:PATH",
              "openai:URL#MODEL  (options: ?key_env=VAR&max_retries=N&max_concurrency=N&timeout=S)")


class JudgeError(RuntimeError):
    """A judge could not do its job at all (bad credentials, server unreachable, ...)."""


@dataclass
class CompareResult:
    """Per-item outcomes of a comparison plus what went wrong along the way.

    ``outcomes[i]`` is 1.0 (a wins), 0.0 (b wins) or 0.5 (tie). ``ties`` counts every 0.5,
    whatever its cause; ``inconsistent``, ``unparseable`` and ``errors`` count the items
    made a tie because the two orders disagreed, a verdict could not be read, or a request
    failed (always 0 for scoring judges).
    """

    outcomes: list[float]
    ties: int = 0
    inconsistent: int = 0
    unparseable: int = 0
    errors: int = 0

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def wins(self) -> int:
        return sum(o == WIN for o in self.outcomes)

    @property
    def losses(self) -> int:
        return sum(o == LOSS for o in self.outcomes)

    def win_rate(self, confidence: float = 0.95) -> WinRate:
        """Win rate of "a" over "b" with a Wilson interval (:func:`preftune.evaluation.metrics.win_rate`)."""
        return win_rate(self.outcomes, confidence)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: strings unchanged, message lists as ``role: content`` blocks."""
    if isinstance(prompt, str) or is_messages(prompt):
        return messages_text(prompt)
    raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")


def check_lengths(**lists: Sequence) -> int:
    """The common length of the given lists; ValueError naming them when they differ."""
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lists must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


class Judge:
    """Base class: ``compare`` is the one method every judge has."""

    spec: str = ""

    def compare(self, prompts: Sequence[Prompt], responses_a: Sequence[str],
                responses_b: Sequence[str]) -> CompareResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class ScoringJudge(Judge):
    """A judge that gives each response a number; it compares two responses by their scores."""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts, responses_a, responses_b) -> CompareResult:
        n = check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        # One score call over a and b together, so batched judges batch across both.
        scores = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
        return compare_scores(scores[:n], scores[n:])

    def cache_parts(self) -> dict | None:
        """What this judge's scores depend on besides the prompt and response (for a cache key such as
        :class:`preftune.evaluation.evaluate.BaseCache`'s), or None: its scores are not to be cached."""
        return None


def compare_scores(scores_a: Sequence[float], scores_b: Sequence[float]) -> CompareResult:
    """Outcomes of a vs b item by item: the higher score wins, equal scores tie."""
    check_lengths(scores_a=scores_a, scores_b=scores_b)
    outcomes = [WIN if sa > sb else LOSS if sa < sb else TIE for sa, sb in zip(scores_a, scores_b)]
    return CompareResult(outcomes=outcomes, ties=sum(o == TIE for o in outcomes))


# ----------------------------------------------------------------------------- python:


class PythonJudge(ScoringJudge):
    """Scores with a Python function ``f(prompt: str, response: str) -> float`` (higher is better).

    Message-list prompts reach the function as :func:`prompt_text`.
    """

    def __init__(self, function: Callable[[str, str], float], spec: str = ""):
        self.function = function
        self.spec = spec or f"python:{getattr(function, '__module__', '?')}:{getattr(function, '__name__', '?')}"

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


# ----------------------------------------------------------------------------- reward-model:


class RewardModelJudge(ScoringJudge):
    """Scores with a reward model (``preftune train --loss reward``, or any one-logit
    ``AutoModelForSequenceClassification`` folder): its scalar on prompt + response.

    The text goes through the training data path (:func:`preftune.data.tokenize.tokenize_example`,
    the collate functions, :func:`preftune.model.logprobs.batch_logps`), so a response is scored exactly
    as the reward model saw its training pairs: a message-list prompt with the response as the
    assistant turn under the chat template, a plain prompt with the response and EOS. Batched, no
    grad, eval mode, loaded with ``trust_remote_code=False``; ``max_length`` keeps the end of long
    prompts as training does (None: no limit); ``mixed_precision`` as ``preftune train``'s.
    """

    def __init__(self, path: str, batch_size: int = 8, max_length: int | None = None, device: str | None = None,
                 spec: str = "", dtype: str = "float32", mixed_precision: str = "no"):
        import torch

        from preftune.model.loading import is_reward_model_folder, load_model, load_tokenizer
        from preftune.model.precision import resolve_compute_dtype

        self.spec = spec or f"reward-model:{path}"
        if not is_reward_model_folder(path):
            raise ValueError(f"could not load the reward model from {path!r}: not a reward model folder (a "
                             "config.json with a one-label ...ForSequenceClassification architecture); train one "
                             "with preftune train --loss reward")
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, dtype, head="reward")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.compute_dtype = resolve_compute_dtype(mixed_precision, self.device)  # autocast, as in training
        self._weights: str | None = None  # weights_fingerprint, computed on the first cache_parts()

    def examples(self, prompts, responses) -> list:
        """The responses as finished replies on the training path, one completion each
        (:func:`preftune.evaluation.sampling.scoring_example`, as ``sequence_logps(..., append_eos=True)``)."""
        from preftune.data.tokenize import special_prefix_ids
        from preftune.evaluation.sampling import scoring_example

        prefix = special_prefix_ids(self.tokenizer)
        out = []
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            tokenized = scoring_example(self.tokenizer, prompt, response, True, index, prefix, self.max_length)
            if tokenized is None:
                raise ValueError(f"response {index} is empty after truncation to max_length {self.max_length}")
            out.append(tokenized)
        return out

    def score(self, prompts, responses) -> list[float]:
        import torch

        from preftune.data.collate import collate_padded
        from preftune.model.logprobs import batch_logps

        check_lengths(prompts=prompts, responses=responses)
        examples = self.examples(prompts, responses)
        # Longest first (as the training loop's length-grouped batches): a padded batch then holds texts
        # of similar length, not one long prompt's worth of padding per row; an out-of-memory error
        # shows at the first batch. Scores come back in the responses' order.
        order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
        scores: list[float] = [0.0] * len(examples)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                # Padded, one row per response: a response's score never depends on what shares its row, so
                # identical responses tie exactly (packed rows differ from padded in the last float bits).
                batch = collate_padded([examples[i] for i in rows],
                                       pad_id=self.tokenizer.pad_token_id).to(self.device)
                rewards = batch_logps(self.model, batch, compute_dtype=self.compute_dtype).rewards
                for i, value in zip(rows, rewards.float().cpu().tolist()):
                    scores[i] = value
        return scores

    def cache_parts(self) -> dict:
        from preftune.training.reference import tokenizer_fingerprint, weights_fingerprint

        if self._weights is None:
            self._weights = weights_fingerprint(self.model)
        return {"judge": "reward-model", "judge_weights": self._weights,
                "judge_tokenizer": tokenizer_fingerprint(self.tokenizer), "judge_batch_size": self.batch_size,
                "judge_max_length": self.max_length, "judge_compute_dtype": str(self.compute_dtype),
                "judge_device": self.device.type}


# ----------------------------------------------------------------------------- make_judge


def make_judge(spec: str, **options) -> Judge:
    """Build a judge from its spec string; ``options`` go to the judge's constructor.

    Raises ValueError listing the accepted forms for anything else.
    """
    if not isinstance(spec, str):
        raise ValueError(f"a judge spec must be a string, got {type(spec).__name__}")
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        if kind == "python":
            return PythonJudge(load_function(rest), spec=spec, **options)
        if kind == "reward-model":
            return RewardModelJudge(rest, spec=spec, **options)
        if kind == "openai":
            from preftune.evaluation.judges.openai import OpenAIJudge

            return OpenAIJudge.from_spec(spec, **options)
    raise ValueError(f"unknown judge spec {spec!r}; use one of:\n  " + "\n  ".join(SPEC_FORMS))
