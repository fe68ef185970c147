"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, the chat ``TEMPLATE`` when it is ChatML, the
default ``SYSTEM`` prompt the chat template adds, and ``PARAMETER stop`` for each EOS token (and
``<|im_end|>``, where a ChatML turn ends).

Ollama formats chats with Go templates, not Jinja. A Jinja template cannot be translated in general,
so :func:`chatml_system` recognises one family by behaviour: the tokenizer's own template is rendered
on probe conversations and compared with ChatML (``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``, the format
of SmolLM2, Qwen2 and preftune's tiny models). A template that renders exactly as ChatML gets
:data:`CHATML_TEMPLATE`; any other gets no TEMPLATE line, and Ollama falls back to its own reading of
the ``tokenizer.chat_template`` stored in the GGUF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from preftune.common.files import write_atomic

# Ollama's Go template for ChatML over .Messages: each message as "<|im_start|>ROLE\nCONTENT<|im_end|>\n",
# then "<|im_start|>assistant\n" after a last message that is not the assistant's. Ollama puts the
# Modelfile's SYSTEM first in .Messages when the conversation has no system message.
CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

_PROBES = (
    ([("system", "Be brief."), ("user", "Hi there."), ("assistant", "Hello."), ("user", "Name a colour.")], True),
    ([("user", "Name a colour.")], True),
    ([("user", "Name a colour."), ("assistant", "Blue.")], False),
)


def chatml(messages, add_generation_prompt: bool) -> str:
    """ChatML text of ``[(role, content)]``."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chatml_system(tokenizer) -> tuple[bool, str | None]:
    """``(is_chatml, default_system)``: whether ``tokenizer``'s chat template renders every probe as ChatML,
    and the system prompt it inserts when a conversation has none (None when it inserts nothing).

    The probe with a system message must render as plain ChatML; the probes that start with a user turn
    may carry one inserted system turn in front, the same on each.
    """
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return False, None
    defaults = set()
    for messages, generation in _PROBES:
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                                 add_generation_prompt=generation)
        except Exception:  # a template that raises on a probe (e.g. one demanding alternating roles)
            return False, None
        expected = chatml(messages, generation)
        if not isinstance(text, str) or not text.endswith(expected):
            return False, None
        prefix = text[:len(text) - len(expected)]
        inserted = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", prefix, re.S)
        if prefix and (messages[0][0] == "system" or not inserted):
            return False, None
        if messages[0][0] != "system":
            defaults.add(inserted.group(1) if inserted else None)
    if len(defaults) != 1:
        return False, None
    return True, defaults.pop()


def modelfile_text(gguf_name: str, tokenizer, stop_tokens: list[str]) -> tuple[str, bool]:
    """``(text, has_template)``: the Modelfile for ``gguf_name`` (a file beside it)."""
    lines = [f"FROM ./{gguf_name}", ""]
    is_chatml, system = chatml_system(tokenizer)
    if is_chatml:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        if system:
            lines += [f"SYSTEM {json.dumps(system)}", ""]
    stops = [*stop_tokens, "<|im_end|>"] if is_chatml else stop_tokens  # a ChatML turn ends there
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in dict.fromkeys(stops)]
    return "\n".join(lines).rstrip() + "\n", is_chatml


def write_modelfile(gguf_path: str | Path, tokenizer, stop_tokens: list[str]) -> tuple[Path, bool]:
    """Write ``Modelfile`` beside ``gguf_path`` (atomically); returns its path and whether it has a TEMPLATE."""
    gguf_path = Path(gguf_path)
    text, has_template = modelfile_text(gguf_path.name, tokenizer, stop_tokens)
    path = gguf_path.parent / "Modelfile"
    write_atomic(path, text)
    return path, has_template


def ollama_name(gguf_path: str | Path) -> str:
    """A model name Ollama accepts, from the file name: ``runs/My_Model.Q8_0.gguf`` -> ``my_model-q8_0``."""
    stem = Path(gguf_path).stem.lower().replace(".", "-")
    return re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-") or "model"
