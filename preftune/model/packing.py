"""Can a model run packed (prefix-shared) batches? Decided by a probe forward, not by reading source.

A packed batch is right only if the model's body hands our (R, 1, L, L) mask to every
attention layer unchanged and uses our position ids (see ``preftune.data.collate``). Rather
than look for function names in ``transformers``' code (a refactor there would silently turn
packing off, or on), :func:`supports_packing` runs the model itself on a tiny batch, twice:
packed, and padded (one row per sequence; the model builds its own causal mask). The
per-token log-probs must agree. Two groups, each a short prompt with two completions: 21
tokens packed into one row of 24, four padded rows of 9: cheap even for a large model.

The verdict is cached on the causal LM (attribute ``_preftune_packing``), keyed by what it
depends on (attention implementation, sliding window, layer types), and the latest decision
is recorded there too (:func:`preftune.model.masks.record_packing_decision`), so that a packed
batch reaching a refused model raises instead of running wrong; nothing is probed per batch. A
model mixing full and sliding-window layers is probed in both mask forms at once: the
per-layer-type dict (needed once a sequence is longer than the window) and one plain mask for
all layers (enough while every sequence fits).

What a short probe cannot see: masking a body adds by *column* beyond the probe's 24-column
row (GPT-Neo's ``local`` layers, window 256); such layer types are refused from the config.

Packing is decided once, where the batch builder is made: :func:`make_collate` (given the
decision) and :func:`scoring_collate` (deciding it) build the collate function from plain
values. The probe hands ``batch_logps`` a batch whose mask is already in the attention's form,
so the probe never reads the recorded decision it is making.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from functools import partial

import torch
from torch import nn

from preftune.data.collate import attention_cost, collate_packed, collate_padded
from preftune.data.records import TokenizedExample
from preftune.model.anatomy import attention_implementation, body, causal_lm, sliding_layout, text_config
from preftune.model.logprobs import batch_logps
from preftune.model.masks import PACKING_ATTENTION, REFUSAL_ATTR, build_packed_mask, record_packing_decision

log = logging.getLogger(__name__)

_CACHE_ATTR = "_preftune_packing"
# Probe groups as (prompt length, completion lengths): sequences of 7, 9, 7 and 5 tokens.
_PROBE_GROUPS = ((4, (3, 5)), (3, (4, 2)))
_PROBE_LONGEST = max(prompt + max(completions) for prompt, completions in _PROBE_GROUPS)
# Layer types whose mask is ours to build; "global" is GPT-Neo's name for full attention.
_KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention", "global"}


def supports_packing(model: nn.Module, max_length: int | None = None) -> tuple[bool, str]:
    """(True, why) if ``model`` can run packed batches, else (False, why); ``why`` is for the log.

    Static checks first (configuration, not source text): an attention implementation that
    takes a custom 4D mask (sdpa, eager, flex_attention), a body whose ``forward`` takes
    ``position_ids``, no layer types but full and sliding-window attention. Then the probe
    (once per model and configuration): packed per-token log-probs must match padded ones
    within :func:`probe_tolerance`; an exception in the packed forward refuses. For a model
    mixing full and sliding-window layers the per-layer-type mask dict must pass, unless
    ``max_length`` (the longest sequence) fits in the window. Callers fall back to padding.
    """
    lm = causal_lm(model)
    ok, why = _verdict(model, lm, max_length)
    record_packing_decision(lm, ok, why)  # what packed_attention_mask checks: no probe per batch
    return ok, why


def _verdict(model: nn.Module, lm: nn.Module, max_length: int | None) -> tuple[bool, str]:
    """:func:`supports_packing`'s answer: the static refusal, or the (cached) probe's verdict."""
    refusal = _static_refusal(lm)
    if refusal:
        return False, refusal
    window, layer_types = sliding_layout(text_config(lm))
    mixed = layer_types is not None and "full_attention" in layer_types
    key = (attention_implementation(lm), window, tuple(layer_types) if layer_types else None)
    verdicts = lm.__dict__.setdefault(_CACHE_ATTR, {})
    if key not in verdicts:
        verdicts[key] = _probe(model, lm, mixed, window)
        log.debug("packing probe of %s: %s", type(lm).__name__, verdicts[key])
    if not mixed:
        return verdicts[key]["plain"]
    if max_length is not None and max_length <= window:
        ok, why = verdicts[key]["plain"]
        return ok, f"every sequence fits in the sliding window ({max_length} <= {window}): {why}"
    return verdicts[key]["dict"]


def probe_tolerance(dtype: torch.dtype) -> float:
    """Max |log-prob difference| per token the probe accepts: 1e-4 in fp32 (the bar of
    tests/model/test_logprobs.py), 16 units of the dtype's resolution in half precision (fp16 0.016,
    bf16 0.125), where the two layouts' differently shaped matmuls round differently. A mask
    the body ignores lets tokens see another completion and another group: 0.28 nats even for
    a tiny random Llama, whole nats for a trained model."""
    return max(1e-4, 16 * torch.finfo(dtype).eps)


def forget_packing_verdict(model: nn.Module) -> None:
    """Drop the cached verdicts and the recorded decision (after changing a model's layers in place)."""
    lm = causal_lm(model)
    lm.__dict__.pop(_CACHE_ATTR, None)
    lm.__dict__.pop(REFUSAL_ATTR, None)


def _static_refusal(lm: nn.Module) -> str:
    """Why the configuration alone rules packing out, or ''."""
    impl = attention_implementation(lm)
    if impl not in PACKING_ATTENTION:
        return (f"attention {impl!r} cannot take a custom attention mask; prefix-shared packing "
                f"needs one of {', '.join(PACKING_ATTENTION)}")
    decoder = body(lm)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{type(decoder).__name__}.forward takes no position_ids"
    config = text_config(lm)
    # ``attention_layers``: GPT-Neo's layer types; its "local" layers window by column, not position.
    layer_types = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None) or []
    unknown = set(layer_types) - _KNOWN_LAYER_TYPES
    if unknown:
        return (f"layer types {sorted(unknown)} are not supported by packing (only full and sliding-window "
                "attention, whose window is folded into the packed mask)")
    return ""


# ----------------------------------------------------------------------------- batch builders


def packing_decision(*models: nn.Module | None) -> tuple[bool, str]:
    """(True, why) if every model of ``models`` (None skipped: no reference model) can run packed
    batches, else (False, the first refusal): one decision for every model the batches reach."""
    verdicts = [supports_packing(model) for model in models if model is not None]
    refused = [verdict for verdict in verdicts if not verdict[0]]
    return refused[0] if refused else verdicts[0]


def model_row_cost(model: nn.Module) -> float | None:
    """:func:`~preftune.data.collate.attention_cost` of ``model``'s text config (None when it names no
    hidden size): what lets packed rows take several groups where that is cheaper than padding."""
    config = text_config(model)
    hidden = getattr(config, "hidden_size", None)
    return attention_cost(hidden, getattr(config, "intermediate_size", None)) if hidden else None


def make_collate(pad_id: int, packing: bool, pack_tokens: int | None = None, train_on_prompt: bool = False,
                 row_cost: float | None = None):
    """The batch builder, packed when ``packing`` (decided by :func:`supports_packing` /
    :func:`packing_decision`), else padded; ``row_cost`` (:func:`model_row_cost`) lets packed rows
    take several groups where that is cheaper than padding."""
    if packing:
        return partial(collate_packed, pad_id=pad_id, pack_tokens=pack_tokens,
                       train_on_prompt=train_on_prompt, row_cost=row_cost)
    return partial(collate_padded, pad_id=pad_id, train_on_prompt=train_on_prompt)


def scoring_collate(model: nn.Module, pad_id: int, packing: bool = True):
    """The batch builder for scoring (generation, KL): packed when ``packing`` and ``model`` can run
    packed batches (:func:`supports_packing`, decided here once), else padded; no prompt tokens scored."""
    if not (packing and supports_packing(model)[0]):
        return partial(collate_padded, pad_id=pad_id)
    return partial(collate_packed, pad_id=pad_id, row_cost=model_row_cost(model))


# ----------------------------------------------------------------------------- the probe


def _probe(model: nn.Module, lm: nn.Module, mixed: bool, window: int | None) -> dict[str, tuple[bool, str]]:
    """{"plain": verdict}, plus "dict" for a model mixing full and sliding-window layers."""
    with _eval_mode(lm), torch.no_grad():
        if not mixed:
            return {"plain": _probe_form(model, lm, _PROBE_LONGEST, layer_dict=False)}
        if window < 2:
            plain = False, f"sliding window {window} is too short to probe"
        else:  # one mask for every layer serves only sequences within the window
            plain = _probe_form(model, lm, min(_PROBE_LONGEST, window), layer_dict=False)
        return {"plain": plain, "dict": _probe_form(model, lm, _PROBE_LONGEST, layer_dict=True)}


def _probe_form(model: nn.Module, lm: nn.Module, longest: int, layer_dict: bool) -> tuple[bool, str]:
    """Packed vs padded per-token log-probs of the probe batch; sequences of at most ``longest``."""
    embeddings = lm.get_input_embeddings()
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    examples = _probe_examples(lm, longest)
    name = type(body(lm)).__name__
    form = " with the per-layer-type mask dict" if layer_dict else ""
    try:
        padded = batch_logps(model, collate_padded(examples, pad_id=0).to(device))
    except Exception as error:  # noqa: BLE001 - the model cannot even run padded batches
        return False, f"padded probe forward of {name} failed: {_first_line(error)}"
    # Both groups in one row, right padded to 24: tests group isolation, completion isolation
    # (the rejected tokens must not see the chosen ones), continued position ids and padding.
    packed = collate_packed(examples, pad_id=0, pack_tokens=10_000, pad_to_multiple_of=8).to(device)
    try:
        mask = build_packed_mask(lm, packed, layer_dict=layer_dict)
        # batch_logps hands an unpacked batch's mask to the body as it is: ours is converted already.
        out = batch_logps(model, dataclasses.replace(packed, attention_mask=mask, packed=False))
    except Exception as error:  # noqa: BLE001 - any failure of the packed forward means: no packing
        return False, f"packed probe forward of {name}{form} raised {_first_line(error)}"
    # A reward model's probe compares its rewards (the last token of each sequence) instead.
    values, expected = ((out.rewards, padded.rewards) if out.rewards is not None
                        else (out.token_logps, padded.token_logps))
    if not torch.isfinite(values).all():
        return False, f"packed probe forward of {name}{form} gave non-finite log-probs"
    diff = float((values - expected).abs().max())
    tolerance = probe_tolerance(dtype)
    precision = f"{str(dtype).removeprefix('torch.')} {attention_implementation(lm)}"
    numbers = f"max |diff| {diff:.1e}, tolerance {tolerance:.2g} for {precision}"
    if diff <= tolerance:
        return True, f"packed probe forward{form} matched separate forwards ({numbers})"
    return False, (f"packed probe forward of {name}{form} differs from separate forwards ({numbers}): "
                   "the body does not honour a custom 4D attention mask or the position ids")


def _probe_examples(lm: nn.Module, longest: int) -> list[TokenizedExample]:
    """The probe's two groups: seeded random token ids within the vocabulary (no pad / BOS /
    EOS ids), no sequence longer than ``longest`` (>= 2) tokens."""
    config = text_config(lm)
    vocab = min(lm.get_input_embeddings().num_embeddings, getattr(config, "vocab_size", None) or 2**31)
    special = {getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special] or [0])
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist()

    examples = []
    for index, (prompt_len, completion_lens) in enumerate(_PROBE_GROUPS):
        prompt_len = min(prompt_len, longest - 1)
        completions = [ids(min(n, longest - prompt_len)) for n in completion_lens]
        examples.append(TokenizedExample(index=index, prompt_ids=ids(prompt_len), completions=completions))
    return examples


@contextlib.contextmanager
def _eval_mode(lm: nn.Module):
    """Eval mode (no dropout) inside; every module's own training flag restored after."""
    modes = [(module, module.training) for module in lm.modules()]
    lm.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
