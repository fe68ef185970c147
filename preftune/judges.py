"""Judges: who wrote the better response, "a" or "b"?

Build one from a spec string with :func:`make_judge`:

* ``python:module:function`` or ``python:path/to/file.py:function`` — a Python function
  ``f(prompt: str, response: str) -> float``; higher is better.
* ``reward-model:PATH`` — a sequence-classification reward model (one label); the score
  is its logit on prompt + response.
* ``openai:URL#MODEL`` — an OpenAI-compatible chat-completions server asked pairwise,
  once in each order to cancel position bias (:class:`OpenAIJudge`).

Every judge has ``compare(prompts, responses_a, responses_b) -> CompareResult`` with one
outcome per item: 1 (a wins), 0 (b wins), 0.5 (tie). The first two kinds are *scoring*
judges: they also have ``score(prompts, responses) -> list[float]`` and compare by score
(equal scores tie). Prompts are plain strings or chat message lists
(``[{"role": ..., "content": ...}]``); see :func:`prompt_text`.
"""

from __future__ import annotations

import http.client
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from preftune.stats import LOSS, TIE, WIN, WinRate, win_rate

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
        """Win rate of "a" over "b" with a Wilson interval (:func:`preftune.stats.win_rate`)."""
        return win_rate(self.outcomes, confidence)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: strings unchanged, message lists as ``role: content`` blocks."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "\n\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in prompt)
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
        outcomes = [WIN if sa > sb else LOSS if sa < sb else TIE for sa, sb in zip(scores[:n], scores[n:])]
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
    """Scores with a sequence-classification reward model: the (single) logit of prompt + response.

    The text scored is the tokenizer's chat template applied to the prompt's messages plus
    the response as an assistant turn when the prompt is a message list and the tokenizer
    has a template; otherwise plain ``prompt + response``. Batched, no grad, eval mode.
    Loaded with ``trust_remote_code=False``.
    """

    def __init__(self, path: str, batch_size: int = 8, max_length: int | None = None, device: str | None = None,
                 spec: str = ""):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = spec or f"reward-model:{path}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not load the reward model from {path!r}: {str(exc).splitlines()[0]}") from None
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path!r} has num_labels={self.model.config.num_labels}; "
                             "a reward model must output one logit (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"reward model tokenizer {path!r} has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Classification heads read the last non-pad token; they find it by the config's pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, prompt: Prompt, response: str) -> str:
        if not isinstance(prompt, str) and getattr(self.tokenizer, "chat_template", None):
            messages = list(prompt) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt_text(prompt) + response

    def score(self, prompts, responses) -> list[float]:
        import torch

        check_lengths(prompts=prompts, responses=responses)
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            # Template output that already starts with BOS must not get a second one.
            bos = self.tokenizer.bos_token
            add_special = not (bos and all(t.startswith(bos) for t in chunk))
            encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special,
                                     truncation=self.max_length is not None, max_length=self.max_length)
            with torch.no_grad():
                logits = self.model(input_ids=encoded["input_ids"].to(self.device),
                                    attention_mask=encoded["attention_mask"].to(self.device)).logits  # (B, 1)
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


# ----------------------------------------------------------------------------- openai:

JUDGE_SYSTEM_PROMPT = "You are a careful, impartial judge of AI assistant responses."

JUDGE_PROMPT = """Two AI assistants answered the same user prompt. Decide which response is better: \
more helpful, more correct, and harmless. Judge the content only: do not let the order of the \
responses, their length, or the labels "A" and "B" influence you.

[User prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Explain your reasoning in a few sentences. Then end with a final line that is exactly \
"Winner: A" or "Winner: B"."""

# HTTP statuses worth retrying: timeouts, rate limits, server errors.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# Spec query options and their types: openai:URL#MODEL?key_env=MY_KEY&max_retries=3
OPENAI_OPTIONS = {"key_env": str, "max_retries": int, "max_parse_retries": int, "max_concurrency": int,
                  "timeout": float, "retry_base_delay": float, "temperature": float, "max_tokens": int}

_WINNER_LINE = re.compile(r"(?i:winner|verdict|final answer)\b(.*)")
_BARE_VERDICT = re.compile(r"^(?:(?i:response|answer|assistant|option)\s+)?([AB])$")


def parse_verdict(reply: str | None) -> str | None:
    """"A", "B" or None from a judge's reply.

    Rules, first match wins: (1) the last line with "winner", "verdict" or "final answer"
    followed by a capital A or B ("Winner: A", "**Winner:** [B]", "Verdict - Response A")
    decides, if exactly one of the two letters follows the keyword (else None: "Winner: A
    or B"); (2) the whole reply, stripped of markup and punctuation, is "A" / "B" /
    "Response A" ...; (3) the same for its last non-empty line. Anything else is None,
    including a lower-case "a" and a reply that never commits.
    """
    if not reply:
        return None
    lines = [line for line in reply.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _WINNER_LINE.search(line)
        letters = set(re.findall(r"\b([AB])\b", match.group(1))) if match else set()
        if letters:
            return letters.pop() if len(letters) == 1 else None
    for candidate in (reply, lines[-1] if lines else ""):
        bare = re.sub(r"[\s*_`'\"\[\]().:!#-]+", " ", candidate).strip()
        match = _BARE_VERDICT.match(bare)
        if match:
            return match.group(1)
    return None


class _RequestFailed(Exception):
    """A request still failed after every retry (or the reply was not chat-completions JSON)."""


class OpenAIJudge(Judge):
    """Pairwise judge on an OpenAI-compatible ``/chat/completions`` endpoint (stdlib HTTP only).

    **Endpoint rule.** ``URL`` with trailing slashes removed; if it already ends with
    ``/chat/completions`` it is used as is, otherwise ``/chat/completions`` is appended
    (the OpenAI client's base-URL rule): ``http://host:8000/v1`` ->
    ``http://host:8000/v1/chat/completions``.

    **Both orders.** Each item is asked twice, (a, b) as (A, B) and then swapped. Both
    verdicts name the same response -> it wins; they disagree -> tie, counted
    ``inconsistent`` (a judge that always says "A" produces only ties).

    **Failures.** 408/409/429/5xx statuses, connection errors and timeouts are retried
    ``max_retries`` times with exponential backoff ``retry_base_delay * 2**attempt`` (at
    least a numeric ``Retry-After``, at most 60 s). Other 4xx statuses (401: bad key, 404:
    bad URL or model) raise :class:`JudgeError` at once, and so does a comparison in which
    every request failed. A reply whose verdict can't be read (:func:`parse_verdict`) is
    asked again up to ``max_parse_retries`` times. An item with a request that still
    failed counts as a tie in ``errors``; one with an unreadable verdict (and no failure)
    as a tie in ``unparseable``.

    **Key.** ``Authorization: Bearer $KEY_ENV`` (default ``OPENAI_API_KEY``). If the
    default variable is unset no header is sent (local servers need none); a ``key_env``
    that was named explicitly must be set.
    """

    def __init__(self, url: str, model: str, key_env: str | None = None, max_retries: int = 4,
                 max_parse_retries: int = 1, max_concurrency: int = 8, timeout: float = 60.0,
                 retry_base_delay: float = 1.0, temperature: float = 0.0, max_tokens: int | None = None,
                 spec: str = ""):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"openai judge URL must start with http:// or https://, got {url!r}")
        if not model:
            raise ValueError("openai judge needs a model name: openai:URL#MODEL")
        for name, value in (("max_retries", max_retries), ("max_parse_retries", max_parse_retries)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("max_concurrency", max_concurrency), ("timeout", timeout)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.key_env = key_env or "OPENAI_API_KEY"
        self.api_key = os.environ.get(self.key_env)
        if key_env and not self.api_key:
            raise ValueError(f"openai judge: environment variable {key_env} (key_env) is not set")
        self.max_retries, self.max_parse_retries = max_retries, max_parse_retries
        self.max_concurrency, self.timeout = max_concurrency, timeout
        self.retry_base_delay, self.temperature, self.max_tokens = retry_base_delay, temperature, max_tokens
        self.spec = spec or f"openai:{url}#{model}"

    @classmethod
    def from_spec(cls, spec: str, **options) -> "OpenAIJudge":
        """``openai:URL#MODEL[?option=value&...]``; keyword ``options`` override the spec's."""
        url, sep, model_part = spec.removeprefix("openai:").rpartition("#")
        if not sep or not url or not model_part:
            raise ValueError(f"openai judge spec must be openai:URL#MODEL, got {spec!r}")
        model, _, query = model_part.partition("?")
        parsed: dict = {}
        for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
            if key not in OPENAI_OPTIONS:
                raise ValueError(f"unknown openai judge option {key!r}; known: {', '.join(OPENAI_OPTIONS)}")
            try:
                parsed[key] = OPENAI_OPTIONS[key](values[-1])
            except ValueError:
                raise ValueError(f"openai judge option {key}={values[-1]!r} is not a valid "
                                 f"{OPENAI_OPTIONS[key].__name__}") from None
        return cls(url, model, spec=spec, **{**parsed, **options})

    def compare(self, prompts, responses_a, responses_b) -> CompareResult:
        n = check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        if n == 0:
            return CompareResult(outcomes=[])
        texts = [prompt_text(p) for p in prompts]
        # verdicts[i] = (verdict with a shown as A, verdict with b shown as A); each "A", "B",
        # "unparseable" or "error".
        verdicts: list[list[str]] = [["", ""] for _ in range(n)]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, 2 * n))
        try:
            futures = {}
            for i in range(n):
                futures[pool.submit(self.verdict, texts[i], responses_a[i], responses_b[i])] = (i, 0)
                futures[pool.submit(self.verdict, texts[i], responses_b[i], responses_a[i])] = (i, 1)
            for future in as_completed(futures):
                i, order = futures[future]
                verdicts[i][order] = future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if all(v == "error" for pair in verdicts for v in pair):
            raise JudgeError(f"every request to {self.endpoint} failed after {self.max_retries} retries")
        result = CompareResult(outcomes=[])
        for first, swapped in verdicts:
            if "error" in (first, swapped):
                result.errors += 1
                outcome = TIE
            elif "unparseable" in (first, swapped):
                result.unparseable += 1
                outcome = TIE
            elif (first == "A") == (swapped == "B"):
                outcome = WIN if first == "A" else LOSS
            else:
                result.inconsistent += 1
                outcome = TIE
            result.outcomes.append(outcome)
        result.ties = sum(o == TIE for o in result.outcomes)
        return result

    def verdict(self, prompt: str, response_a: str, response_b: str) -> str:
        """Ask once (plus parse retries): "A", "B", "unparseable" or "error"."""
        content = JUDGE_PROMPT.format(prompt=prompt, response_a=response_a, response_b=response_b)
        body = {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                             {"role": "user", "content": content}]}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        for _ in range(self.max_parse_retries + 1):
            try:
                reply = self.post(body)
            except _RequestFailed as exc:
                log.warning("judge request failed: %s", exc)
                return "error"
            letter = parse_verdict(reply)
            if letter is not None:
                return letter
            log.debug("unparseable judge reply: %.200r", reply)
        return "unparseable"

    def post(self, body: dict) -> str | None:
        """POST ``body``; the reply's message content (None when the JSON has none)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            delay = self.retry_base_delay * 2 ** attempt
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace").strip().splitlines()
                last_error = f"HTTP {exc.code} {exc.reason}: {detail[0][:200] if detail else ''}"
                if exc.code not in RETRY_STATUSES:
                    raise JudgeError(f"{self.endpoint} answered {last_error}"
                                     + (f" (is {self.key_env} set?)" if exc.code in (401, 403) else "")) from None
                retry_after = exc.headers.get("Retry-After", "") if exc.headers else ""
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < self.max_retries:
                time.sleep(min(delay, 60.0))
        else:
            raise _RequestFailed(last_error)
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None  # not chat-completions JSON: an unreadable verdict, asked again


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
            return OpenAIJudge.from_spec(spec, **options)
    raise ValueError(f"unknown judge spec {spec!r}; use one of:\n  " + "\n  ".join(SPEC_FORMS))
