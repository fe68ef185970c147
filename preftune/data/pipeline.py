"""The data path the training loop and evaluation share: read a source into tokenized examples for
a method (with KTO's KL partners), build the batch collate function, and lay out batch order across
ranks and labels. Moved here from the loop (STYLE: helpers the loop and evaluation share live with
the data path)."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import torch

from preftune.data.collate import attention_cost, collate_packed, collate_padded
from preftune.data.load import load_dataset

if TYPE_CHECKING:
    from preftune.config.train_config import TrainConfig

log = logging.getLogger("preftune")


def attach_kl_partners(examples, seed: int) -> None:
    """KTO: give each example a mismatched completion (another example's) for the KL point.

    Fixed per dataset (seeded derangement), so it can be cached like any completion.
    Completion 0 stays the example's own; completion 1 is the partner's.
    """
    n = len(examples)
    if n < 2:
        raise ValueError("KTO needs at least 2 examples to estimate its KL reference point")
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randperm(n, generator=gen)
    for pos, idx in enumerate(shift.tolist()):
        partner = shift[(pos + 1) % n].item()
        examples[idx].completions = [examples[idx].completions[0], examples[partner].completions[0]]


def balanced_split(ids: list[int], num_tokens, world: int) -> list[list[int]]:
    """Deal a global batch to ``world`` ranks: counts differ by at most one, tokens balanced.

    Longest first, in snake order (0, 1, ..., w-1, w-1, ..., 0, ...), so no rank waits on a
    much longer share. ``num_tokens(i)`` is example i's token count.
    """
    parts: list[list[int]] = [[] for _ in range(world)]
    for pos, i in enumerate(sorted(ids, key=lambda i: (-num_tokens(i), i))):
        lap, offset = divmod(pos, world)
        parts[offset if lap % 2 == 0 else world - 1 - offset].append(i)
    return parts


def mixed_label_batches(examples, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """KTO batch order in which every batch mixes desirable and undesirable examples.

    Each label's examples are shuffled on their own and then interleaved in proportion to the
    label counts, so a batch of 8 from balanced data holds ~4 of each. (A sequential sampler over
    a paired file unpaired in blocks yields single-label batches and degenerates KTO's KL point;
    a plain shuffle still leaves some.) The batches themselves are then shuffled.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    positive = [i for i, ex in enumerate(examples) if ex.label]
    negative = [i for i, ex in enumerate(examples) if not ex.label]
    positive = [positive[j] for j in torch.randperm(len(positive), generator=gen).tolist()]
    negative = [negative[j] for j in torch.randperm(len(negative), generator=gen).tolist()]
    order, p, n = [], 0, 0
    while p < len(positive) or n < len(negative):
        # take from the label that is furthest behind its share
        if n >= len(negative) or (p < len(positive) and p * len(negative) <= n * len(positive)):
            order.append(positive[p])
            p += 1
        else:
            order.append(negative[n])
            n += 1
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def model_row_cost(model) -> float | None:
    """:func:`~preftune.data.collate.attention_cost` of ``model``'s text config (None when it names no
    hidden size): what lets packed rows take several groups where that is cheaper than padding."""
    from preftune.model.logprobs import _text_config

    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None)
    return attention_cost(hidden, getattr(config, "intermediate_size", None)) if hidden else None


def scoring_collate(model, pad_id: int, packing: bool = True):
    """The training loop's batch builder for scoring without a TrainConfig (generation, KL): packed
    when ``packing`` and ``model`` can run packed batches
    (:func:`~preftune.model.packing.supports_packing`), else padded; no prompt tokens scored."""
    from preftune.model.packing import supports_packing

    if not (packing and supports_packing(model)[0]):
        return partial(collate_padded, pad_id=pad_id)
    return partial(collate_packed, pad_id=pad_id, row_cost=model_row_cost(model))


def make_collate(cfg: TrainConfig, pad_id: int, packing: bool, row_cost: float | None = None):
    """The batch builder; ``row_cost`` (:func:`preftune.data.collate.attention_cost`) lets packed rows
    take several groups where that is cheaper than padding."""
    if packing:
        return partial(collate_packed, pad_id=pad_id, pack_tokens=cfg.pack_tokens,
                       train_on_prompt=cfg.train_on_prompt, row_cost=row_cost)
    return partial(collate_padded, pad_id=pad_id, train_on_prompt=cfg.train_on_prompt)


def read_examples(cfg: TrainConfig, tokenizer, source: str, main: bool):
    """Tokenized examples of ``source`` for this method, with the report logged on rank 0."""
    examples, report = load_dataset(source, tokenizer, kind=cfg.kind, max_length=cfg.max_length,
                                    max_prompt_length=cfg.max_prompt_length,
                                    skip_bad_records=cfg.skip_bad_records, limit=cfg.max_examples)
    if main:
        log.info("%s: %s", source, report.summary())
        if report.bad_records:
            log.warning("%s: skipped %d bad record(s) (--skip-bad-records); first: %s", source, report.bad_records,
                        "; ".join(report.bad_record_samples))
    if not examples:
        raise ValueError(f"{source}: no usable examples ({report.summary()})")
    if cfg.method.kl_partners:  # KTO's KL reference point (the method table says who needs it)
        attach_kl_partners(examples, cfg.seed)
    return examples, report
