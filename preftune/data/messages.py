"""Chat messages as plain text: the one rendering used wherever a prompt or a reply that may be a list
of ``{"role", "content"}`` messages must become a string without a tokenizer's chat template (judges'
prompts, grouping prompts for a split). Training and scoring use the tokenizer's template instead."""

from __future__ import annotations


def is_messages(value) -> bool:
    """True for a list (or tuple) of dicts that each have a ``content``."""
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value)


def messages_text(value: str | list) -> str:
    """A string unchanged; messages as ``role: content`` blocks separated by a blank line (role ``user``
    when missing). ValueError for anything else."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return "\n\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in value)
    raise ValueError(f"expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")
