"""The parts of a ``transformers`` model that preftune reaches for: the causal LM inside any
wrapper, its text config, its body (decoder without the head), its attention implementation and
its sliding-window layout.

One place for these, so that log-probs, packing, the memory policy and the collate builders
agree on what "the body" or "the text config" of a model (peft-wrapped, multimodal, reward head)
is.
"""

from __future__ import annotations

from torch import nn


class CausalLMWrapper(nn.Module):
    """A module holding a causal LM as ``self.model`` (:class:`preftune.model.logprobs.LogProbModel`);
    :func:`causal_lm` looks through it."""

    model: nn.Module


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``transformers`` causal LM inside ``model`` (peft: with adapters injected)."""
    if isinstance(model, CausalLMWrapper):
        model = model.model
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError("batch_logps got a DDP-wrapped model: wrap LogProbModel(model) with DDP instead, "
                         "so that DDP's forward runs and gradients are synchronised")
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft.PeftModel
        active = getattr(model, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            raise ValueError("prompt-learning adapters (prefix/prompt tuning) are not supported by batch_logps")
        model = model.get_base_model()
    return model


def text_config(model: nn.Module):
    """The config of ``model``'s text part (a multimodal model's text config, else its own config)."""
    return text_part(model.config)


def text_part(config):
    """The text config inside a model config (a multimodal config's text config, else ``config``)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def body(lm: nn.Module) -> nn.Module:
    """The decoder of causal LM ``lm``: the module that maps ids to (R, L, H) hidden states."""
    found = getattr(lm, "base_model", lm)
    if found is lm and hasattr(lm, "get_decoder"):
        found = lm.get_decoder()
    if found is lm:
        raise ValueError(f"cannot find the body (decoder) of {type(lm).__name__}")
    return found


def attention_implementation(lm: nn.Module) -> str:
    """The attention implementation ``lm`` runs (``sdpa``, ``eager``, ``flash_attention_2`` ...)."""
    return getattr(lm.config, "_attn_implementation", None) or "eager"


def sliding_layout(config) -> tuple[int | None, list[str] | None]:
    """(window, layer types) of the sliding-window layers; (None, None) without any."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return None, None
    if layer_types is None:
        return window, None  # every layer slides (Mistral)
    if "sliding_attention" not in layer_types:
        return None, None
    return window, list(layer_types)


def no_split_modules(model: nn.Module) -> list[str] | None:
    """The transformer layer class names of ``model``, or ``None`` (a peft wrapper forwards the
    attribute to the model it wraps)."""
    names = getattr(model, "_no_split_modules", None)
    return list(names) if names else None
