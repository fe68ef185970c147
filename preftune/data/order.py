"""The order of examples in batches: length-grouped or token-budget batches, shards across ranks
balanced in tokens, KTO's label-mixed batches and its KL partners. Deterministic for a seed and an
epoch. Lists of example positions in, lists of example positions out; tensors are
:mod:`preftune.data.collate`'s.
"""

from __future__ import annotations

import torch

from preftune.data.records import TokenizedExample


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _shuffled_batches(batches: list[list[int]], lengths: list[int], gen: torch.Generator) -> list[list[int]]:
    """Shuffle batch order, then move the batch holding the longest example first (an
    out-of-memory error then shows at step 1, not hours in)."""
    batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def batch_indices(
    examples: list[TokenizedExample],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    length_grouped: bool = True,
    mega_batch_factor: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Split ``range(len(examples))`` into batches of ``batch_size`` (list positions, not ``.index``).

    Length grouping (less padding): shuffle, cut into mega-batches of ``batch_size *
    mega_batch_factor``, sort each by length (``num_tokens``) longest first, cut into
    batches, then shuffle the batches. Deterministic for ``(seed, epoch)``. Without
    ``shuffle`` the order is kept (sorted within mega-batches when ``length_grouped``).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(examples)
    if n == 0:
        return []
    gen = _generator(seed, epoch)
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    lengths = [ex.num_tokens for ex in examples]
    if length_grouped:
        mega = batch_size * max(1, mega_batch_factor)
        order = [i for m in range(0, n, mega) for i in sorted(order[m:m + mega], key=lambda i: -lengths[i])]
    batches = [order[b:b + batch_size] for b in range(0, n, batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and length_grouped and batches:
        batches = _shuffled_batches(batches, lengths, gen)
    return batches


def token_budget_batches(
    examples: list[TokenizedExample],
    max_tokens: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    packed: bool = True,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """Batches of about ``max_tokens`` tokens each, so steps are balanced in work, not rows.

    Cost of a batch: ``sum(num_tokens)`` in the packed layout, ``rows * longest sequence``
    in the padded one (``packed=False``). Examples are shuffled (deterministic for
    ``(seed, epoch)``), sorted by length within mega-groups of about ``mega_batch_factor``
    batches, filled greedily up to the budget, and the batches shuffled. An example over
    the budget alone forms its own batch. Nothing is dropped.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    n = len(examples)
    if n == 0:
        return []
    gen = _generator(seed, epoch)
    lengths = [ex.num_tokens for ex in examples]
    rows = [len(ex.completions) for ex in examples]
    longest = [max(len(ex.prompt_ids) + len(c) for c in ex.completions) if ex.completions else 0 for ex in examples]
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    per_example = max(1, sum(lengths) // n)
    mega = max(1, mega_batch_factor * max(1, max_tokens // per_example))
    order = [i for m in range(0, n, mega) for i in sorted(order[m:m + mega], key=lambda i: -lengths[i])]

    batches: list[list[int]] = []
    current: list[int] = []
    cost_sum, cost_rows, cost_width = 0, 0, 0
    for i in order:
        if packed:
            new_cost = cost_sum + lengths[i]
        else:
            new_cost = (cost_rows + rows[i]) * max(cost_width, longest[i])
        if current and new_cost > max_tokens:
            batches.append(current)
            current, cost_sum, cost_rows, cost_width = [], 0, 0, 0
        current.append(i)
        cost_sum += lengths[i]
        cost_rows += rows[i]
        cost_width = max(cost_width, longest[i])
    batches.append(current)
    if shuffle:
        batches = _shuffled_batches(batches, lengths, gen)
    return batches


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's batches: every rank gets the same number of steps, no index is dropped
    or repeated.

    Full rounds go round-robin (batch ``b`` to rank ``b % world``); the batches of a last,
    incomplete round are merged and their indices dealt out evenly, so each rank still
    takes that step. With fewer leftover indices than ranks some ranks get an empty batch
    for the last step: the loop must still run its collectives for it (zero loss).
    """
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    full = len(batches) // world * world
    mine = batches[rank:full:world]
    leftover = [i for b in batches[full:] for i in b]
    if leftover:
        mine.append(leftover[rank::world])
    return mine


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
    gen = _generator(seed, epoch)
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
