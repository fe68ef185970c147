"""``Example`` -> ``TokenizedExample``: boundary-exact token ids, one BOS, EOS, truncation.

The contract (see :class:`~preftune.data.records.TokenizedExample`): for every completion ``k``,
``prompt_ids + completions[k]`` are exactly the ids of the full rendered text. How we get there:

1. **Render.** Plain text: the prompt, and ``prompt + completion``. Chat messages: the prompt
   through ``apply_chat_template(prompt, add_generation_prompt=True)``, and each full
   conversation (prompt + completion messages) through ``apply_chat_template``.
2. **Tokenize the full texts**, never the completion alone, without special tokens; put the
   tokenizer's own leading special tokens (its BOS, found by :func:`special_prefix_ids`) in
   front once — unless the rendered prompt already starts with them (a template that writes
   ``{{ bos_token }}``), so there is never a second BOS.
3. **Cut.** The prompt ids are the longest common prefix of the prompt's ids and every full
   text's ids; each completion is the rest of its full ids. When BPE merges a token across
   the boundary (a prompt ending in a space, say) the merged token goes to the completion.
4. **EOS.** Plain-text completions get the tokenizer's EOS appended (unless they already end
   with it). Chat completions end where the template ends the turn (e.g. ``<|im_end|>\\n``):
   no EOS is added, as the template's end-of-turn is what the model must learn to emit and
   what generation stops on (TRL does the same).
5. **Truncate.** ``max_prompt_length`` keeps the *end* of the prompt (after the BOS, which is
   kept). ``max_length`` bounds prompt + longest completion by cutting completions from the
   right. If the prompt alone leaves no room for a completion token the example is dropped
   (``None``): we never return an empty completion (it would give a 0/0 mean log-prob and a
   NaN loss with length-normalised losses). Set ``max_prompt_length`` below ``max_length``
   to shorten long prompts instead of dropping them.

A chat template that renders the prompt differently inside the full conversation (some change
earlier turns once a later one exists) makes step 3 cut after the longest common prefix of the
rendered texts; that is counted (``report.template_mismatches``) or warned about, never silent.

**Huge records** are bounded before they are tokenized (:func:`bound_example`): with ``max_length``
set, each text is cut to ``max_length * CHARS_PER_TOKEN_BOUND`` characters (the prompt, and each
prompt message, keeps its end; completions keep their start), since no kept token can lie further
than that from the end of the prompt or the start of a completion unless tokens average more than
:data:`CHARS_PER_TOKEN_BOUND` characters. A 20 MB record then costs what a 32 KB one does (not
gigabytes of token ids), and the ids are those of tokenize-then-truncate: when the cut text yields
fewer than the needed tokens plus :data:`SAFETY_TOKENS` (very long tokens), the record is
tokenized whole instead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

from preftune.data.errors import DataError
from preftune.data.records import Example, TokenizedExample
from preftune.data.report import DataReport

CHARS_PER_TOKEN_BOUND = 32  # characters kept per token of max_length before tokenizing (English: ~4 per token)
SAFETY_TOKENS = 16  # tokens the cut text must yield beyond those kept, else the record is tokenized whole


def tokenize_example(tokenizer, example: Example, index: int, max_length: int | None = None,
                     max_prompt_length: int | None = None, *, report: DataReport | None = None,
                     prefix_ids: list[int] | None = None) -> TokenizedExample | None:
    """Tokenize one :class:`Example`; ``None`` when truncation would empty a completion.

    ``completions`` is ``[chosen_ids, rejected_ids]`` for pairs, the responses' ids for a group
    (in order, ``scores`` kept), ``[completion_ids]`` otherwise. ``report`` (a :class:`~preftune.data.report.DataReport`) counts chat-template mismatches and
    boundary merges; without it a template mismatch is a ``UserWarning``. ``prefix_ids`` may pass
    a precomputed :func:`special_prefix_ids` (saves two encodes per call).
    Raises ``ValueError`` for bad lengths or a messages example with no chat template, and
    :class:`DataError` when the template fails on the record or the ids cannot be cut.
    """
    _check_length("max_length", max_length)
    _check_length("max_prompt_length", max_prompt_length)
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    bounded, cuts = bound_example(example, max_length)
    texts, append_eos, mismatch = render(tokenizer, bounded)
    bodies = [_encode(tokenizer, text, add_special_tokens=False) for text in texts]
    if cuts and not bound_was_safe(bodies, cuts, max_length, max_prompt_length):
        texts, append_eos, mismatch = render(tokenizer, example)
        bodies = [_encode(tokenizer, text, add_special_tokens=False) for text in texts]
    if mismatch and report is None:
        warnings.warn(f"{example.location}: the chat template renders the prompt differently inside "
                      "the full conversation; the completion was cut after their longest common prefix",
                      stacklevel=2)
    return assemble(tokenizer, example, index, bodies, prefix, append_eos, max_length, max_prompt_length,
                    report, mismatch)


def tokenize_examples(tokenizer, examples: list[Example], max_length: int | None = None,
                      max_prompt_length: int | None = None, *, report: DataReport,
                      on_bad: Callable[[DataError], None], chunk_size: int = 512,
                      progress: bool = False) -> list[TokenizedExample]:
    """:func:`tokenize_example` over a list, encoding in batches (the tokenizer's threads run them
    in parallel). Kept examples get ``index`` = their position in the result. ``report`` counts
    dropped, truncated, prompt sources, merges and template mismatches; a failing example is passed
    to ``on_bad`` (which may raise).
    """
    from tqdm.auto import tqdm

    _check_length("max_length", max_length)
    _check_length("max_prompt_length", max_prompt_length)
    prefix = special_prefix_ids(tokenizer)
    out: list[TokenizedExample] = []
    bar = tqdm(total=len(examples), desc="tokenizing", unit="ex", disable=None if progress else True)
    for start in range(0, len(examples), chunk_size):
        rendered = []
        for example in examples[start:start + chunk_size]:
            try:
                bounded, cuts = bound_example(example, max_length)
                rendered.append((example, cuts, *render(tokenizer, bounded)))
            except DataError as err:
                on_bad(err)
        flat = [text for _, _, texts, _, _ in rendered for text in texts]
        encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        offset = 0
        for example, cuts, texts, append_eos, mismatch in rendered:
            bodies = [list(ids) for ids in encoded[offset:offset + len(texts)]]
            offset += len(texts)
            try:
                if cuts and not bound_was_safe(bodies, cuts, max_length, max_prompt_length):
                    texts, append_eos, mismatch = render(tokenizer, example)  # very long tokens: whole
                    bodies = [_encode(tokenizer, text, add_special_tokens=False) for text in texts]
                tokenized = assemble(tokenizer, example, len(out), bodies, prefix, append_eos, max_length,
                                     max_prompt_length, report, mismatch)
            except DataError as err:
                on_bad(err)
                continue
            if tokenized is None:
                report.dropped += 1
                continue
            out.append(tokenized)
            report.truncated += tokenized.truncated
            report.prompt_sources[example.prompt_source] = report.prompt_sources.get(example.prompt_source, 0) + 1
        bar.update(min(chunk_size, len(examples) - start))
    bar.close()
    return out


def render_prompt(tokenizer, prompt) -> str:
    """A prompt to sample from: plain text unchanged; a message list through the chat template
    (generation prompt on), as :func:`render_messages` renders a training prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a prompt is a list of messages but the tokenizer has no chat template; "
                         "pass plain-text prompts or a tokenizer with a template")
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer, prompt, prefix_ids: list[int] | None = None) -> list[int]:
    """The prompt's ids as the training data path builds them: the rendered prompt encoded without
    special tokens, the tokenizer's BOS (:func:`special_prefix_ids`, or
    ``prefix_ids``) put in front unless the rendered text starts with it already.

    Equal to a training example's ``prompt_ids`` unless a token merges across the boundary with
    its completion (then training moves that token to the completion; there is no completion here).
    """
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    body = list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    ids, _, _ = split_ids(body, [body], prefix)  # the prompt as its own full text: nothing to cut
    if not ids:
        raise ValueError(f"prompt {prompt!r:.60} encodes to no tokens; a completion needs at least one "
                         "token before it to be predicted from")
    return ids


def bound_example(example: Example, max_length: int | None) -> tuple[Example, tuple[bool, ...] | None]:
    """``example`` with every text longer than ``max_length * CHARS_PER_TOKEN_BOUND`` characters cut to
    that (prompt texts keep their end, completion texts their start), and which parts were cut:
    ``(prompt_cut, completion_0_cut, ...)``, or ``None`` when nothing was (the example itself is returned).
    """
    if max_length is None or CHARS_PER_TOKEN_BOUND is None:
        return example, None
    limit = max_length * CHARS_PER_TOKEN_BOUND

    def cut(text, keep_end: bool):
        if isinstance(text, str):
            if len(text) <= limit:
                return text, False
            return (text[-limit:] if keep_end else text[:limit]), True
        if isinstance(text, list):  # chat messages: each content on its own
            out, any_cut = [], False
            for message in text:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str) and len(content) > limit:
                    message = {**message, "content": content[-limit:] if keep_end else content[:limit]}
                    any_cut = True
                out.append(message)
            return (out, True) if any_cut else (text, False)
        return text, False

    prompt, prompt_cut = cut(example.prompt, keep_end=True)
    completions = [cut(text, keep_end=False) for text in example.completion_texts]
    cuts = (prompt_cut, *(was_cut for _, was_cut in completions))
    if not any(cuts):
        return example, None
    bounded = example.with_completions([text for text, _ in completions])
    return dataclasses.replace(bounded, prompt=prompt), cuts


def bound_was_safe(bodies: list[list[int]], cuts: tuple[bool, ...], max_length: int,
                   max_prompt_length: int | None) -> bool:
    """Whether the cut texts' ids (``bodies``, as from :func:`render`) reach :data:`SAFETY_TOKENS` beyond
    every token truncation keeps, so that the cut cannot have changed a kept token."""
    prompt_tokens = len(bodies[0])
    if cuts[0] and prompt_tokens < min(max_prompt_length or max_length, max_length) + SAFETY_TOKENS:
        return False
    return all(not was_cut or len(full) - prompt_tokens >= max_length + SAFETY_TOKENS
               for was_cut, full in zip(cuts[1:], bodies[1:]))


def render(tokenizer, example: Example) -> tuple[list[str], bool, bool]:
    """The texts to encode, ``[prompt_text, full_text_0, ...]``, then ``append_eos`` and ``mismatch``.

    Plain text: the prompt and ``prompt + completion``; EOS is to be appended. Messages: see
    :func:`render_messages`; no EOS (the template ends the turn).
    """
    completions = example.completion_texts
    if isinstance(example.prompt, list):
        prompt_text, full_texts, mismatch = render_messages(tokenizer, example, completions)
        return [prompt_text, *full_texts], False, mismatch
    return [example.prompt, *(example.prompt + c for c in completions)], True, False


def assemble(tokenizer, example: Example, index: int, bodies: list[list[int]], prefix: list[int],
             append_eos: bool, max_length: int | None, max_prompt_length: int | None,
             report: DataReport | None = None, mismatch: bool = False) -> TokenizedExample | None:
    """Encoded texts (``bodies`` = ids of :func:`render`'s texts, no special tokens) -> the example.

    Cuts at the boundary (:func:`split_ids`), appends EOS, truncates; ``None`` if no room is
    left for a completion under ``max_length``.
    """
    prompt_ids, completion_ids, merged = split_ids(bodies[0], bodies[1:], prefix)
    if report is not None:
        report.boundary_merges += merged
        report.template_mismatches += mismatch
    if any(not ids for ids in completion_ids):
        raise DataError(example.location, "a completion tokenizes to no tokens")
    if not prompt_ids:
        raise DataError(example.location, "the prompt is empty and the tokenizer adds no BOS token: there is "
                                          "no token to predict the first completion token from")
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None:
        completion_ids = [ids if ids[-1] == eos else ids + [eos] for ids in completion_ids]

    keep = len(prefix) if prefix and prompt_ids[:len(prefix)] == prefix else 0
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = keep_end(prompt_ids, max_prompt_length, keep), True
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            return None
        if max(len(ids) for ids in completion_ids) > room:
            completion_ids, truncated = [ids[:room] for ids in completion_ids], True
    return TokenizedExample(index=index, prompt_ids=prompt_ids, completions=completion_ids,
                            label=example.label, location=example.location, truncated=truncated,
                            margin=example.margin, scores=None if example.scores is None else list(example.scores))


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text with ``add_special_tokens=True`` (e.g. ``[bos]``).

    Found by encoding a probe with and without special tokens; trailing specials (an EOS some
    tokenizers append) are not part of it.
    """
    plain = _encode(tokenizer, "a", add_special_tokens=False)
    full = _encode(tokenizer, "a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def split_ids(prompt_body: list[int], full_bodies: list[list[int]],
              prefix: list[int]) -> tuple[list[int], list[list[int]], bool]:
    """Boundary-exact ids: ``(prompt_ids, [completion_ids...], merged)``.

    ``prompt_body``/``full_bodies`` are the prompt's and each full text's ids without special
    tokens. ``prompt_ids + completion_ids[k]`` equals ``prefix + full_bodies[k]`` exactly (the
    prefix only if the prompt does not already start with it). ``merged`` is True when a token
    crossed the prompt/completion boundary, so the prompt ids were shortened.
    """
    head = prefix if prefix and prompt_body[:len(prefix)] != prefix else []
    prompt_ids = head + prompt_body
    full_ids = [head + body for body in full_bodies]
    cut = min(_common_prefix_len(prompt_ids, ids) for ids in full_ids)
    return prompt_ids[:cut], [ids[cut:] for ids in full_ids], cut < len(prompt_ids)


def render_messages(tokenizer, example: Example, completions: list[list]) -> tuple[str, list[str], bool]:
    """Render a messages example: ``(prompt_text, full_texts, mismatch)``.

    ``prompt_text`` is the rendered prompt with the generation prompt, cut back to the longest
    prefix it shares with every full conversation; ``mismatch`` says a cut was needed.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the data holds chat messages but the tokenizer has no chat template; "
                         "set tokenizer.chat_template or use plain-text prompts")
    try:
        prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        full_texts = [tokenizer.apply_chat_template(example.prompt + c, tokenize=False) for c in completions]
    except Exception as err:  # jinja errors (e.g. "roles must alternate") are raised by the template itself
        raise DataError(example.location, f"the chat template failed on this record: {err}") from None
    common = min((os.path.commonprefix([prompt_text, text]) for text in full_texts), key=len)
    return common, full_texts, common != prompt_text


def keep_end(ids: list[int], length: int, keep: int = 0) -> list[int]:
    """The first ``keep`` ids (the BOS) and the last ``length - keep``: ``length`` ids in all."""
    if length <= keep:
        return ids[:length]
    return ids[:keep] + ids[len(ids) - (length - keep):]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_length(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
