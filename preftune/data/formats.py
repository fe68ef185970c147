"""Raw rows -> :class:`~preftune.data.records.Example`, the one schema the rest of the library reads.

Accepted rows (``kind`` says which family; extra keys are ignored):

=========  ====================================================================================
pair       ``prompt``, ``chosen``, ``rejected`` as strings (standard), or as chat messages
           (conversational; ``chosen``/``rejected`` may repeat the prompt messages first), or
           only ``chosen``/``rejected`` sharing their beginning (implicit prompt, see below);
           optionally ``margin`` (a number, read by ``--loss reward``)
unpaired   ``prompt``, ``completion``, ``label`` (bool, or the integers 0/1) — KTO
sft        ``prompt`` and ``completion``, or ``messages`` (the last one, from the assistant, is
           the completion; everything before it the prompt)
group      ``prompt``, ``responses`` (k >= 2 texts or message lists) and ``scores`` (k finite
           numbers, higher = better) or ``ranks`` (k finite numbers, lower = better; stored as
           scores ``max(ranks) - rank``); ties allowed. Also UltraFeedback's raw rows
           (``instruction`` or ``prompt``, ``completions: [{"response", "overall_score"}]``, the
           score falling back to ``fine-grained_score``, then to the mean of the ``annotations``'
           numeric ``Rating`` values), and a pair row (a group of two scored 1 and 0)
=========  ====================================================================================

A *chat message* is ``{"role": str, "content": str}``; completion messages must be the
assistant's. Within one :class:`Example` the prompt and completions are either all strings or
all message lists (a string prompt with message completions becomes one user message, a string
completion with a message prompt one assistant message).

Implicit prompts are cut at a turn boundary, never at a character: for dialogue text at the last
``"\\n\\nAssistant:"`` that both sides share (the prompt ends with it, the completions are the final
replies, e.g. ``" I can't help with that."``), for message lists after the last shared message.
"...Assistant: blue" / "...Assistant: black" gives the prompt "...Assistant:", never "...bl".

Every bad record raises :class:`~preftune.data.errors.DataError` naming the place and the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from preftune.data.errors import DataError
from preftune.data.records import Example, Location

ASSISTANT_MARKER = "\n\nAssistant:"  # the turn boundary of Anthropic HH-style dialogue text
KINDS = ("pair", "unpaired", "sft", "group")
_MISSING = object()


def to_example(row: dict, location: Location | None, kind: str) -> Example:
    """Convert one raw row into an :class:`Example` of ``kind`` ("pair", "unpaired", "sft" or "group").
    A response group row (:func:`is_group_row`) read as "pair" gives a group :class:`Example`.

    Raises :class:`DataError` (with ``location``) for a bad record, ``ValueError`` for a bad ``kind``.
    """
    if kind == "pair":
        return _group(row, location) if is_group_row(row) else _pair(row, location)
    if kind == "unpaired":
        return _unpaired(row, location)
    if kind == "sft":
        return _sft(row, location)
    if kind == "group":
        return _group(row, location)
    raise ValueError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")


def pairs_to_unpaired(examples: Iterable[Example]) -> list[Example]:
    """Each pair -> ``(prompt, chosen, label=True)`` then ``(prompt, rejected, label=False)``.

    The output alternates labels, so reading it in order never gives single-label KTO batches.
    """
    out = []
    for ex in examples:
        _require_pair(ex, "pairs_to_unpaired")
        for completion, label in ((ex.chosen, True), (ex.rejected, False)):
            out.append(Example(kind="unpaired", prompt=ex.prompt, completion=completion, label=label,
                               location=ex.location, prompt_source=ex.prompt_source))
    return out


def chosen_as_sft(examples: Iterable[Example]) -> list[Example]:
    """The chosen side of each pair as an SFT example ``(prompt, completion=chosen)``."""
    out = []
    for ex in examples:
        _require_pair(ex, "chosen_as_sft")
        out.append(Example(kind="sft", prompt=ex.prompt, completion=ex.chosen, location=ex.location,
                           prompt_source=ex.prompt_source))
    return out


def is_group_row(row: dict) -> bool:
    """True for a row holding a response group: ``responses`` (a group record) or UltraFeedback's raw
    ``completions`` list of objects, and no ``chosen`` / ``rejected``. Read for a pair method, such a row
    is read as a group (pair losses train on a group's ordered pairs)."""
    if "chosen" in row or "rejected" in row:
        return False
    completions = row.get("completions")
    return "responses" in row or (isinstance(completions, list) and all(isinstance(c, dict) for c in completions))


def is_pair_row(row: dict) -> bool:
    """True for a row holding a preference pair (``chosen`` and ``rejected``, no ``completion``).

    A ``messages`` field beside them (UltraFeedback-binarized repeats the chosen conversation
    there) does not make it something else."""
    return "chosen" in row and "rejected" in row and "completion" not in row


def split_dialogue(chosen: str, rejected: str, location: Location | None) -> tuple[str, str, str]:
    """Implicit prompt of two dialogue texts: ``(prompt, chosen_reply, rejected_reply)``.

    The prompt runs up to and including the last ``"\\n\\nAssistant:"`` lying wholly inside the
    common beginning of both texts, so ``prompt + chosen_reply == chosen``.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(location, "no 'prompt' field, and 'chosen' and 'rejected' share no "
                                  "'\\n\\nAssistant:' turn to split the prompt at; add a 'prompt' field",
                        reason="prompt_split")
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def split_messages(chosen: list, rejected: list, location: Location | None) -> tuple[list, list, list]:
    """Implicit prompt of two message lists: the messages both start with, and the rest of each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(location, "no 'prompt' field, and 'chosen' and 'rejected' share no leading "
                                  "message to use as the prompt; add a 'prompt' field", reason="prompt_split")
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ---------------------------------------------------------------------------- the kinds


def _pair(row: dict, location: Location | None) -> Example:
    chosen = _text_or_messages(row, "chosen", location)
    rejected = _text_or_messages(row, "rejected", location)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(location, "'chosen' and 'rejected' must both be strings or both lists of messages")
    if chosen == rejected:
        raise DataError(location, "'chosen' and 'rejected' are identical", reason="identical")
    prompt = row.get("prompt")
    source = "explicit"
    if prompt is None:
        source = "implicit"
        if isinstance(chosen, str):
            prompt, chosen, rejected = split_dialogue(chosen, rejected, location)
        else:
            prompt, chosen, rejected = split_messages(chosen, rejected, location)
    else:
        prompt = _text_or_messages(row, "prompt", location)
        if isinstance(prompt, str) and isinstance(chosen, list) and not _fits_string_prompt(prompt, chosen, rejected):
            # A string prompt beside full conversations (e.g. UltraFeedback): trust the messages.
            source = "implicit"
            prompt, chosen, rejected = split_messages(chosen, rejected, location)
        else:
            prompt, (chosen, rejected) = _align(prompt, [chosen, rejected])
    _check_completion(chosen, "chosen", location)
    _check_completion(rejected, "rejected", location)
    if chosen == rejected:
        raise DataError(location, "'chosen' and 'rejected' are identical after the prompt", reason="identical")
    return Example(kind="pair", prompt=prompt, chosen=chosen, rejected=rejected, location=location,
                   prompt_source=source, margin=_margin(row, location))


def _margin(row: dict, location: Location | None) -> float | None:
    """A pair's optional ``margin`` (how much better chosen is; reward-model training, as TRL's)."""
    value = row.get("margin")
    return None if value is None else _finite(value, "margin", location)


def _unpaired(row: dict, location: Location | None) -> Example:
    prompt = _text_or_messages(row, "prompt", location)
    completion = _text_or_messages(row, "completion", location)
    label = _label(row, location)
    prompt, (completion,) = _align(prompt, [completion])
    _check_completion(completion, "completion", location)
    return Example(kind="unpaired", prompt=prompt, completion=completion, label=label, location=location)


def _sft(row: dict, location: Location | None) -> Example:
    if "completion" not in row and row.get("messages") is not None:
        messages = _text_or_messages(row, "messages", location)
        if isinstance(messages, str):
            raise DataError(location, "field 'messages' must be a list of messages, got str")
        if messages[-1]["role"] != "assistant":
            raise DataError(location, f"field 'messages': the last message must be the assistant's "
                                      f"(the completion), got role {messages[-1]['role']!r}")
        if len(messages) < 2:
            raise DataError(location, "field 'messages' needs a prompt message before the assistant's")
        completion = messages[-1:]
        _check_completion(completion, "messages", location)
        return Example(kind="sft", prompt=messages[:-1], completion=completion, location=location,
                       prompt_source="messages")
    if "completion" not in row:
        raise DataError(location, "field 'completion' is missing (an SFT record needs 'prompt' and "
                                  "'completion', or 'messages')")
    prompt = _text_or_messages(row, "prompt", location)
    completion = _text_or_messages(row, "completion", location)
    prompt, (completion,) = _align(prompt, [completion])
    _check_completion(completion, "completion", location)
    return Example(kind="sft", prompt=prompt, completion=completion, location=location)


def _group(row: dict, location: Location | None) -> Example:
    """A group record, an UltraFeedback raw row, or a pair row (a group of two) -> a group :class:`Example`."""
    if "responses" not in row and isinstance(row.get("completions"), list):
        prompt_field = "instruction" if row.get("instruction") is not None else "prompt"
        prompt = _text_or_messages(row, prompt_field, location)
        responses, scores = _ultrafeedback_completions(row["completions"], location)
    elif "responses" not in row and is_pair_row(row):
        pair = _pair(row, location)
        return Example(kind="group", prompt=pair.prompt, responses=[pair.chosen, pair.rejected], scores=[1.0, 0.0],
                       location=location, prompt_source=pair.prompt_source)
    else:
        prompt = _text_or_messages(row, "prompt", location)
        responses = _responses(row.get("responses", _MISSING), location)
        scores = _group_scores(row, len(responses), location)
    prompt, responses = _align(prompt, responses)
    for i, response in enumerate(responses):
        _check_completion(response, f"responses[{i}]", location)
    return Example(kind="group", prompt=prompt, responses=responses, scores=scores, location=location)


def _responses(value, location: Location | None) -> list:
    """A group's ``responses``: a list of at least two texts or message lists."""
    if value is _MISSING or value is None:
        raise DataError(location, "field 'responses' is missing (a group record needs 'prompt', 'responses' and "
                                  "'scores' or 'ranks')")
    if not isinstance(value, list):
        raise DataError(location, f"field 'responses' must be a list of responses, got {_type_name(value)}")
    if len(value) < 2:
        raise DataError(location, f"field 'responses' holds {len(value)} response(s); a group needs at least 2")
    return [_checked_text(response, f"responses[{i}]", location) for i, response in enumerate(value)]


def _group_scores(row: dict, k: int, location: Location | None) -> list[float]:
    """A group's scores (higher = better) from ``scores``, or from ``ranks`` (lower = better) as
    ``max(ranks) - rank``, checked: k finite numbers."""
    has_scores, has_ranks = row.get("scores") is not None, row.get("ranks") is not None
    if has_scores == has_ranks:
        what = "both 'scores' and 'ranks'; give one" if has_scores else "no 'scores' or 'ranks'"
        raise DataError(location, f"the group has {what} (one number per response)")
    name = "scores" if has_scores else "ranks"
    values = row[name]
    if not isinstance(values, list):
        raise DataError(location, f"field {name!r} must be a list of numbers, got {_type_name(values)}")
    if len(values) != k:
        raise DataError(location, f"field {name!r} has {len(values)} value(s) for {k} responses")
    numbers = [_finite(value, f"{name}[{i}]", location) for i, value in enumerate(values)]
    if name == "ranks":
        worst = max(numbers)
        numbers = [worst - rank for rank in numbers]
    return numbers


def _finite(value, name: str, location: Location | None) -> float:
    """``value`` as a float when it is a finite number (not true/false)."""
    try:
        number = None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # an integer beyond float range
        number = None
    if number is None or not math.isfinite(number):
        raise DataError(location, f"field {name!r} must be a finite number, got {value!r:.60}")
    return number


def _ultrafeedback_completions(completions: list, location: Location | None) -> tuple[list, list[float]]:
    """UltraFeedback's ``completions``: each ``{"response", "overall_score"}`` (else ``fine-grained_score``,
    else the mean numeric ``annotations.*.Rating``) -> (responses, scores)."""
    if len(completions) < 2:
        raise DataError(location, f"field 'completions' holds {len(completions)} completion(s); a group needs "
                                  "at least 2")
    responses, scores = [], []
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict):
            raise DataError(location, f"field 'completions[{i}]' must be an object with 'response' and "
                                      f"'overall_score', got {_type_name(completion)}")
        responses.append(_checked_text(completion.get("response", _MISSING), f"completions[{i}].response", location))
        scores.append(_ultrafeedback_score(completion, f"completions[{i}]", location))
    return responses, scores


def _ultrafeedback_score(completion: dict, name: str, location: Location | None) -> float:
    for key in ("overall_score", "fine-grained_score"):
        if completion.get(key) is not None:
            return _finite(completion[key], f"{name}.{key}", location)
    annotations = completion.get("annotations")
    ratings = []
    for aspect in (annotations.values() if isinstance(annotations, dict) else ()):
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):  # "N/A" and missing ratings are left out
            continue
    ratings = [r for r in ratings if math.isfinite(r)]
    if not ratings:
        raise DataError(location, f"field '{name}' has no score: no finite 'overall_score', "
                                  "'fine-grained_score' or numeric 'annotations' Rating")
    return sum(ratings) / len(ratings)


# ---------------------------------------------------------------------------- field checks


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _text_or_messages(row: dict, name: str, location: Location | None) -> str | list:
    """``row[name]`` as a string or a validated list of messages (dicts with string role/content)."""
    return _checked_text(row.get(name, _MISSING), name, location)


def _checked_text(value, name: str, location: Location | None) -> str | list:
    """``value`` (field ``name``) as a string or a validated list of messages."""
    if value is _MISSING or value is None:
        raise DataError(location, f"field {name!r} is missing")
    if isinstance(value, str):
        return _valid_text(value, f"field {name!r}", location)
    if not isinstance(value, list):
        raise DataError(location, f"field {name!r} must be a string or a list of messages, "
                                  f"got {_type_name(value)}")
    if not value:
        raise DataError(location, f"field {name!r} is an empty list of messages")
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise DataError(location, f"field {name!r} message {i}: expected an object with 'role' and "
                                      f"'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise DataError(location, f"field {name!r} message {i}: {key!r} is missing")
            if not isinstance(message[key], str):
                raise DataError(location, f"field {name!r} message {i}: {key!r} must be a string, "
                                          f"got {_type_name(message[key])}")
        for key in ("role", "content"):
            _valid_text(message[key], f"field {name!r} message {i}: {key!r}", location)
        if not message["role"].strip():
            raise DataError(location, f"field {name!r} message {i}: 'role' is empty")
    return value


def _valid_text(text: str, what: str, location: Location | None) -> str:
    """``text`` unless it holds a lone UTF-16 surrogate (JSON allows ``"\\ud800"``; tokenizers fail on it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(location, f"{what} holds an unpaired surrogate {text[err.start]!r} "
                                  f"(at character {err.start + 1})") from None
    return text


def _label(row: dict, location: Location | None) -> bool:
    value = row.get("label", _MISSING)
    if value is _MISSING or value is None:
        raise DataError(location, "field 'label' is missing")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(location, f"field 'label' must be true/false (or 0/1), got {value!r}")


def _check_completion(completion: str | list, name: str, location: Location | None) -> None:
    """A completion is non-empty text, or assistant messages with some non-empty content."""
    if isinstance(completion, str):
        if not completion.strip():
            raise DataError(location, f"field {name!r} is empty or whitespace only", reason="empty")
        return
    if not completion:
        raise DataError(location, f"field {name!r} has no messages after the prompt", reason="empty")
    for i, message in enumerate(completion, 1):
        if message["role"] != "assistant":
            raise DataError(location, f"field {name!r}: completion message {i} must have role 'assistant', "
                                      f"got {message['role']!r}")
    if not "".join(m["content"] for m in completion).strip():
        raise DataError(location, f"field {name!r} is empty or whitespace only", reason="empty")


def _fits_string_prompt(prompt: str, *completions: list) -> bool:
    """A string prompt goes with message completions that repeat it first or are all the assistant's."""
    user = {"role": "user", "content": prompt}
    return all(c[:1] == [user] or all(m["role"] == "assistant" for m in c) for c in completions)


def _align(prompt: str | list, completions: list) -> tuple[str | list, list]:
    """Make prompt and completions all strings or all message lists.

    Strings stay strings. Otherwise a string prompt becomes one user message, a string completion
    one assistant message, and completions that start with the prompt messages lose that copy.
    """
    if isinstance(prompt, str) and all(isinstance(c, str) for c in completions):
        return prompt, completions
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    aligned = []
    for completion in completions:
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        elif prompt and completion[:len(prompt)] == prompt:
            completion = completion[len(prompt):]
        aligned.append(completion)
    return prompt, aligned


def _require_pair(example: Example, caller: str) -> None:
    if example.kind != "pair":
        raise ValueError(f"{caller} takes pair examples, got kind {example.kind!r}")
