"""A tokenizer as GGUF metadata: the vocabulary, merges, token types, special ids and chat template.

llama.cpp reads two kinds of BPE vocabulary from a GGUF, and so does transformers' GGUF loader:

* ``gpt2`` -- byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama 3): tokens spelled in the byte alphabet
  (``Ġ`` for a space), the merges, and ``tokenizer.ggml.pre``, the name of the regex that splits text
  before merging. The name is read from the tokenizer's own pre-tokenizer (its structure, not a hash
  of its output), so a runtime splits text as training did; an unknown splitter is refused.
* ``llama`` -- SentencePiece-style BPE (Llama 2, Mistral 7B): ``▁`` for a space, ``<0x0A>`` byte
  tokens (byte fallback), and a score per token. llama.cpp merges the pair whose result scores highest,
  so a token's score is minus the rank of the merge that makes it (the BPE order); the merges are
  written as well, for readers that use them.

:func:`vocabulary_of` reads a ``PreTrainedTokenizerFast`` into a :class:`Vocabulary` (raising
:class:`ExportError` for a kind it cannot write); :func:`write_vocabulary` puts it into a ``GGUFWriter``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

import gguf

log = logging.getLogger("preftune")


class ExportError(ValueError):
    """A model that cannot be exported to GGUF: one line naming what is missing or unsupported."""


# Byte-level splitters llama.cpp knows, by the regex a tokenizer.json's Split pre-tokenizer carries.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class Vocabulary:
    """What ``tokenizer.*`` in a GGUF holds. ``tokens``, ``types`` (and ``scores``) have one entry per
    embedding row, padded with unused ``[PAD<id>]`` tokens up to the model's vocabulary size."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str | None  # llama.cpp's pre-tokenizer name (byte-level only)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | list | None = None
    stop_tokens: list[str] = field(default_factory=list)  # the EOS tokens, as text
    notes: list[str] = field(default_factory=list)  # where a runtime will tokenize differently


def vocabulary_of(tokenizer, vocab_size: int, eos_ids=()) -> Vocabulary:
    """The GGUF vocabulary of ``tokenizer`` (a fast tokenizer), padded to ``vocab_size`` rows.

    ``eos_ids``: further end-of-sequence ids (a generation config's list) for :attr:`Vocabulary.stop_tokens`.
    Raises :class:`ExportError` for a vocabulary that is not BPE, a splitter llama.cpp does not know,
    or more tokens than the model has embedding rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (fast tokenizer): "
                          "the vocabulary cannot be read")
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"vocabulary kind {model.get('type')!r} cannot be exported to GGUF: supported are "
                          "byte-level BPE (GPT-2 style) and SentencePiece-style BPE with byte fallback")
    kind, pre, space_prefix, notes = _kind(state)
    tokens, types = _tokens(tokenizer, state, vocab_size, kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special_ids = {name: i for name, i in special_ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    add_bos, add_eos = _added_specials(tokenizer)
    stops = [tokens[i] for i in dict.fromkeys([special_ids.get("eos"), *eos_ids]) if isinstance(i, int)
             and 0 <= i < len(tokens)]
    return Vocabulary(model=kind, pre=pre, tokens=tokens, types=types, merges=merges,
                      scores=_scores(tokens, merges) if kind == "llama" else None, special_ids=special_ids,
                      add_bos=add_bos, add_eos=add_eos, add_space_prefix=space_prefix,
                      chat_template=getattr(tokenizer, "chat_template", None), stop_tokens=stops, notes=notes)


def write_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    """Add ``vocab`` under llama.cpp's ``tokenizer.*`` keys."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):  # several named templates: "default" first, as llama.cpp lists them
            template = [{"name": name, "template": text} for name, text in template.items()]
        writer.add_chat_template(template)


def _kind(state: dict) -> tuple[str, str | None, bool, list[str]]:
    """``(model, pre, add_space_prefix, notes)`` from a tokenizer.json's normalizer and pre-tokenizer."""
    pre_tok, normalizer = state.get("pre_tokenizer"), state.get("normalizer")
    steps = _flatten(pre_tok)
    if any(step.get("type") == "ByteLevel" for step in steps):
        if normalizer and normalizer.get("type") != "NFC":  # Qwen2's NFC: llama.cpp's converter keeps it too
            raise ExportError(f"byte-level tokenizer with a {normalizer.get('type')} normalizer cannot be exported "
                              "to GGUF (llama.cpp applies none)")
        return "gpt2", _byte_level_pre(steps), False, []
    norm_steps = _flatten(normalizer)
    prepends = any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in norm_steps)
    metaspace = [step for step in steps if step.get("type") == "Metaspace"]
    if state["model"].get("byte_fallback") and (metaspace or prepends):
        scheme = metaspace[0].get("prepend_scheme", "always") if metaspace else None
        notes = [] if prepends else ["text that starts with a space, or follows a special token, tokenizes "
                                     "differently in llama.cpp (this tokenizer's Metaspace adds no '▁' there; "
                                     "llama.cpp does)"]
        return "llama", None, prepends or scheme in ("first", "always"), notes
    described = ", ".join(step.get("type", "?") for step in steps) or "none"
    raise ExportError(f"BPE tokenizer with pre-tokenizer [{described}] is neither byte-level nor "
                      "SentencePiece-style (byte fallback + '▁'): llama.cpp has no equivalent")


def _byte_level_pre(steps: list[dict]) -> str:
    """llama.cpp's name for a byte-level splitter: ``gpt-2`` (GPT-2's regex), ``smollm`` (digits
    one by one, then GPT-2's regex), ``qwen2`` or ``llama-bpe`` (their own Split regex)."""
    types = [step.get("type") for step in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        name = SPLIT_NAMES.get(pattern.get("Regex")) if isinstance(pattern, dict) else None
        if name:
            return name
    raise ExportError(f"byte-level pre-tokenizer {json.dumps(steps)[:160]} is not one llama.cpp knows "
                      "(gpt-2, smollm, qwen2, llama-bpe): a runtime would split text differently")


def _flatten(step: dict | None) -> list[dict]:
    if not step:
        return []
    if step.get("type") == "Sequence":
        inner = step.get("pretokenizers", step.get("normalizers", []))
        return [s for child in inner for s in _flatten(child)]
    return [step]


def _tokens(tokenizer, state: dict, vocab_size: int, kind: str) -> tuple[list[str], list[int]]:
    """One token and one ``gguf.TokenType`` per id in ``[0, vocab_size)``; unassigned ids are unused pads."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    past = sorted(i for i in by_id if i >= vocab_size)
    if any(i not in added for i in past):
        raise ExportError(f"the tokenizer has ids up to {past[-1]} but the model embeds only {vocab_size} "
                          "tokens: resize the embeddings before exporting")
    if past:  # a tokenizer class's default added on loading (Qwen2's <|endoftext|>): no embedding row, no token
        log.warning("GGUF export: %s left out: added past the model's %d embedding rows",
                    [by_id[i] for i in past], vocab_size)
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if i == unk:
                types.append(gguf.TokenType.UNKNOWN)
            elif i in added:
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif kind == "llama" and BYTE_TOKEN.match(token):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: minus the rank of the first merge that makes a token; 0 for the rest."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS at the start / EOS at the end (the tokenizer's post-processor)."""
    plain = tokenizer("hello world", add_special_tokens=False).input_ids
    full = tokenizer("hello world").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos
