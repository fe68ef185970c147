"""The ``openai:URL#MODEL`` judge: an OpenAI-compatible chat-completions server asked pairwise.

Each item is asked twice, with the responses in both orders, to cancel position bias; an item
whose two verdicts disagree (or that never parses) is a tie. Requests run concurrently, retry
on rate limits and server errors with backoff, and the API key comes from an environment
variable (never from the spec string). Built by :func:`preftune.evaluation.judges.registry.make_judge`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from preftune.evaluation.judges.base import CompareResult, Judge, JudgeError, check_lengths, prompt_text
from preftune.evaluation.metrics import LOSS, TIE, WIN

log = logging.getLogger("preftune")

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

    spec_form = "openai:URL#MODEL  (options: ?key_env=VAR&max_retries=N&max_concurrency=N&timeout=S)"

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
