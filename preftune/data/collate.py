"""TokenizedExamples -> :class:`preftune.data.batch.Batch` (padded or packed prefix-shared). Which
examples go into a batch together is :mod:`preftune.data.order`'s.

Both layouts list the target tokens the same way: sequence by sequence (``s = k * G + g``),
in text order, so ``token_logps`` of the two layouts can be compared entry by entry.

Padded, 1 group (prompt ``p0 p1``, chosen ``c0 c1``, rejected ``r0``), pad ``_``::

    input_ids     [[p0 p1 c0 c1]        token_rows    [0 0 1]
                   [p0 p1 r0 _ ]]       token_cols    [1 2 1]     (predictor = target col - 1)
    position_ids  [[0 1 2 3] [0 1 2 3]] token_targets [c0 c1 r0]
    attention     [[1 1 1 1] [1 1 1 0]] token_seq     [0 0 1]

Packed, the same group laid out once::

    input_ids     [[p0 p1 c0 c1 r0]]    token_rows    [0 0 0]
    position_ids  [[0  1  2  3  2 ]]    token_cols    [1 2 1]     (r0 is predicted by p1, col 1)
    attention (q rows, kv cols)         token_targets [c0 c1 r0]
        p0 [1 0 0 0 0]                  token_seq     [0 0 1]
        p1 [1 1 0 0 0]
        c0 [1 1 1 0 0]
        c1 [1 1 1 1 0]
        r0 [1 1 0 0 1]   <- sees its prompt and itself, never the chosen tokens

A response group (k completions, ``scores``) is laid out the same way, ``[prompt | r_0 | ... |
r_{k-1}]``: every response attends to the prompt and to itself only, with positions continuing
from the prompt's end. Groups of one batch may differ in k; K is the largest, a group of fewer
responses has no sequences beyond its own (no row, no target; ``Batch.completion_mask`` False),
and ``Batch.scores`` / ``completion_mask`` are (G, K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from preftune.data.batch import Batch
from preftune.data.records import TokenizedExample

# ----------------------------------------------------------------------------- helpers


def _spans(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand spans of ``lengths`` (n,) into per-element (owner span, offset in span), each (sum,)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return owner, torch.arange(int(lengths.sum())) - starts[owner]


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else int(math.ceil(n / multiple) * multiple)


def _group_completions(examples: list[TokenizedExample], kl_completions: bool) -> list[list[list[int]]]:
    """Completions of each group: ``[g][k] -> ids``. With ``kl_completions`` (KTO) each group
    gets a second, mismatched completion: completion 0 of group ``(g + 1) % G``. Response groups
    (examples with ``scores``) may differ in k; other examples must all have the same number."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    k = len(examples[0].completions)
    groups = all(ex.scores is not None for ex in examples)
    if not groups and any(ex.scores is not None for ex in examples):
        raise ValueError("a batch mixes response groups (examples with scores) with other examples; read the "
                         "pairs as groups of two (data kind 'group') or keep them in separate files")
    for ex in examples:
        if len(ex.completions) != k and not groups:
            raise ValueError(
                f"all examples of a batch need the same number of completions; example {ex.index} has "
                f"{len(ex.completions)}, the first has {k}"
            )
        if ex.scores is not None and len(ex.scores) != len(ex.completions):
            raise ValueError(f"example {ex.index}: {len(ex.scores)} scores for {len(ex.completions)} completions")
    if kl_completions:
        if k != 1:
            raise ValueError(f"kl_completions needs examples with exactly one completion (KTO), got {k}")
        g_count = len(examples)
        return [[ex.completions[0], examples[(g + 1) % g_count].completions[0]] for g, ex in enumerate(examples)]
    return [list(ex.completions) for ex in examples]


def _sequences(groups: list[list[list[int]]]) -> list[tuple[int, int]]:
    """``(k, g)`` of every sequence present, in sequence order ``s = k * G + g`` with ``K = max k``:
    a group of fewer completions than ``K`` has no sequences ``k >= its k``."""
    g_count, k_count = len(groups), max(len(c) for c in groups)
    return [(k, g) for k in range(k_count) for g in range(g_count) if k < len(groups[g])]


def _group_scores(examples: list[TokenizedExample], k_count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Response groups: ``(scores, completion_mask)``, each (G, K): the scores (0 where a group has fewer
    than K completions) and which completions exist. ``(None, None)`` unless every example has scores."""
    if not all(ex.scores is not None for ex in examples):
        return None, None
    scores = torch.zeros((len(examples), k_count), dtype=torch.float32)
    mask = torch.zeros((len(examples), k_count), dtype=torch.bool)
    for g, ex in enumerate(examples):
        scores[g, :len(ex.scores)] = torch.tensor(ex.scores, dtype=torch.float32)
        mask[g, :len(ex.scores)] = True
    return scores, mask


def _margins(examples: list[TokenizedExample]) -> torch.Tensor | None:
    """(G,) each pair's ``margin`` (0 where a pair has none), or None when no example has one."""
    if all(ex.margin is None for ex in examples):
        return None
    return torch.tensor([ex.margin or 0.0 for ex in examples], dtype=torch.float32)


def _labels(examples: list[TokenizedExample]) -> torch.Tensor | None:
    if all(ex.label is not None for ex in examples):
        return torch.tensor([bool(ex.label) for ex in examples], dtype=torch.bool)
    return None


def _check_counts(counts: torch.Tensor, examples: list[TokenizedExample], present: list[tuple[int, int]]) -> None:
    """Refuse sequences without a single target token (their mean log-prob would be NaN); ``counts`` is
    (K * G,), ``present`` the ``(k, g)`` of the sequences that exist (:func:`_sequences`)."""
    g_count = len(examples)
    empty = [(k, g) for k, g in present if int(counts[k * g_count + g]) == 0]
    if empty:
        k, g = empty[0]
        ex = examples[g]
        where = f" ({ex.location})" if ex.location is not None else ""
        raise ValueError(
            f"example {ex.index}{where}: completion {k} has no target token "
            "(empty completion, or a one-token text without a prompt); drop it before collating"
        )


# ----------------------------------------------------------------------------- padded


def collate_padded(
    examples: list[TokenizedExample],
    pad_id: int,
    train_on_prompt: bool = False,
    kl_completions: bool = False,
    pad_to_multiple_of: int | None = None,
) -> Batch:
    """One row per sequence ``[prompt | completion_k | pad...]``, right padded; R = K * G rows
    (response groups of fewer than K completions: one row per completion they have, in sequence order).

    ``position_ids`` are ``arange(L)`` on every row (pad positions are never attended to).
    The target tokens are the completion tokens (plus the prompt tokens but the first with
    ``train_on_prompt``, the SFT option); the hidden state at column ``c - 1`` predicts the
    token at column ``c``. A sequence without a prompt cannot score its first token.
    """
    groups = _group_completions(examples, kl_completions)
    g_count, k_count = len(groups), max(len(c) for c in groups)
    order = _sequences(groups)  # row r holds sequence order[r]
    flat: list[int] = []
    for k, g in order:
        flat += examples[g].prompt_ids
        flat += groups[g][k]
    prompt_len = torch.tensor([len(examples[g].prompt_ids) for _, g in order], dtype=torch.long)  # (R,)
    lengths = prompt_len + torch.tensor([len(groups[g][k]) for k, g in order], dtype=torch.long)  # (R,)
    r_count = len(order)
    width = _round_up(int(lengths.max()), pad_to_multiple_of)

    rows, cols = _spans(lengths)
    input_ids = torch.full((r_count, width), pad_id, dtype=torch.long)
    input_ids[rows, cols] = torch.tensor(flat, dtype=torch.long)
    attention_mask = torch.zeros((r_count, width), dtype=torch.long)
    attention_mask[rows, cols] = 1

    first_target = (torch.ones_like(prompt_len) if train_on_prompt else prompt_len).clamp(min=1)  # (R,)
    row_seq = torch.tensor([k * g_count + g for k, g in order], dtype=torch.long)  # (R,) sequence of each row
    token_rows, offset = _spans((lengths - first_target).clamp(min=0))
    token_seq = row_seq[token_rows]
    _check_counts(torch.bincount(token_seq, minlength=g_count * k_count), examples, order)
    target_cols = first_target[token_rows] + offset
    scores, completion_mask = _group_scores(examples, k_count)
    return Batch(
        input_ids=input_ids,
        position_ids=torch.arange(width).repeat(r_count, 1),
        attention_mask=attention_mask,
        token_rows=token_rows,
        token_cols=target_cols - 1,
        token_targets=input_ids[token_rows, target_cols],
        token_target_cols=target_cols,
        token_seq=token_seq,
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.long),
        num_groups=g_count,
        num_completions=k_count,
        packed=False,
        labels=_labels(examples),
        margins=_margins(examples),
        num_tokens=int(lengths.sum()),
        scores=scores,
        completion_mask=completion_mask,
    )


# ----------------------------------------------------------------------------- packed


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack items of ``lengths`` into bins of ``capacity`` (first fit, longest first).

    Returns the item indices of each bin. An item longer than ``capacity`` gets a bin alone.
    Deterministic: ties are broken by item index.
    """
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def attention_cost(hidden_size: int, intermediate_size: int | None = None) -> float:
    """Work of one row position per position of context, relative to a token's matmul work.

    Per token and layer the projections cost about ``2 (4 H^2 + 3 H I)`` FLOPs (q, k, v, o and a
    gated MLP) and attention ``4 H L`` for a row of L positions (scores and values; a packed row's
    masked-out pairs are computed too). The ratio is ``4 H / (2 (4 H^2 + 3 H I))`` per position:
    for SmolLM2-135M (H 576, I 1536) 2.9e-4, so a 1000-position row spends ~29% more than its
    projections on attention.
    """
    inter = intermediate_size or 4 * hidden_size
    return 4 * hidden_size / (2 * (4 * hidden_size ** 2 + 3 * hidden_size * inter))


def choose_row_capacity(group_len: list[int], cost_per_position: float, multiple: int | None = None,
                        max_mask_elements: int = 2 ** 28) -> int:
    """The row length that makes a packed batch cheapest: rows x width x (1 + cost_per_position x width).

    Rows as long as the longest group waste their tail as padding when groups differ in length;
    longer rows take two or more groups each (less padding, so less memory and matmul work) but
    every position attends over its whole row under the mask. Tries a capacity for each row
    count ``r`` (``max(longest, ceil(total / r))``), packs first-fit-decreasing and keeps the
    cheapest; ties keep the shorter rows. ``max_mask_elements`` bounds the (R, L, L) mask.
    """
    longest, total = max(group_len), sum(group_len)
    best_cost, best_capacity = None, longest
    for rows in range(len(group_len), 0, -1):
        capacity = max(longest, -(-total // rows))
        bins = first_fit_decreasing(group_len, capacity)
        width = _round_up(max(sum(group_len[g] for g in b) for b in bins), multiple)
        if len(bins) * width * width > max_mask_elements:
            break  # longer rows only grow the mask
        cost = len(bins) * width * (1 + cost_per_position * width)
        if best_cost is None or cost < best_cost - 1e-9:
            best_cost, best_capacity = cost, capacity
    return best_capacity


def collate_packed(
    examples: list[TokenizedExample],
    pad_id: int,
    pack_tokens: int | None = None,
    train_on_prompt: bool = False,
    kl_completions: bool = False,
    pad_to_multiple_of: int | None = None,
    row_cost: float | None = None,
) -> Batch:
    """Prefix-shared packing: each group laid out once as ``[prompt | completion_0 | completion_1 ...]``.

    Completion k's position ids continue from the end of the prompt (every completion gets
    the same positions); a completion token attends to its prompt and to its own earlier
    tokens only. The first token of every completion is predicted by the last prompt token,
    so that hidden state is listed K times in ``token_rows/cols``.

    Groups are packed into rows of at most ``pack_tokens`` tokens, first-fit-decreasing; a
    group longer than that gets a row alone. ``pack_tokens=None`` packs into rows as long as
    the longest group (so the batch is never wider than its longest group). Rows are right
    padded to the longest row; a pad token attends to itself only (no all-masked rows). With
    ``row_cost`` (:func:`attention_cost` of the model) and no ``pack_tokens``, the row length is
    :func:`choose_row_capacity`'s: the cheapest trade of padding against masked attention.

    ``attention_mask`` is (R, 1, L, L) bool, True = may attend.
    """
    groups = _group_completions(examples, kl_completions)
    g_count, k_count = len(groups), max(len(c) for c in groups)
    prompts = [ex.prompt_ids for ex in examples]
    group_len = [len(prompts[g]) + sum(len(c) for c in groups[g]) for g in range(g_count)]
    bins = first_fit_decreasing(group_len, _row_capacity(group_len, pack_tokens, row_cost, pad_to_multiple_of))
    layout = _lay_out_rows(bins, prompts, groups)
    width = _round_up(max(layout.row_fill), pad_to_multiple_of)
    input_ids, position_ids, attention_mask, lengths = _packed_rows(layout, len(bins), width, pad_id)
    token_rows, token_cols, target_cols, token_seq = _packed_targets(layout, prompts, groups, train_on_prompt)
    _check_counts(torch.bincount(token_seq, minlength=g_count * k_count), examples, _sequences(groups))
    scores, completion_mask = _group_scores(examples, k_count)
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        token_rows=token_rows,
        token_cols=token_cols,
        token_targets=input_ids[token_rows, target_cols],
        token_target_cols=target_cols,
        token_seq=token_seq,
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.long),
        num_groups=g_count,
        num_completions=k_count,
        packed=True,
        labels=_labels(examples),
        margins=_margins(examples),
        num_tokens=int(lengths.sum()),
        scores=scores,
        completion_mask=completion_mask,
    )


def _row_capacity(group_len: list[int], pack_tokens: int | None, row_cost: float | None,
                  multiple: int | None) -> int:
    """Tokens per packed row: ``pack_tokens``, else :func:`choose_row_capacity`'s with ``row_cost``,
    else the longest group."""
    if pack_tokens is not None:
        capacity = pack_tokens
    elif row_cost is not None:
        capacity = choose_row_capacity(group_len, row_cost, multiple)
    else:
        capacity = max(group_len)
    if capacity <= 0:
        raise ValueError(f"pack_tokens must be positive, got {pack_tokens}")
    return capacity


@dataclass
class _RowLayout:
    """Where each segment (a prompt or a completion) of a packed batch sits, in row order."""

    seg_row: list[int] = field(default_factory=list)  # row of each segment
    seg_col: list[int] = field(default_factory=list)  # its first column
    seg_len: list[int] = field(default_factory=list)  # its length
    seg_pos: list[int] = field(default_factory=list)  # its first position id
    seg_group: list[int] = field(default_factory=list)  # its group
    seg_kind: list[int] = field(default_factory=list)  # 0 = prompt, k + 1 = completion k
    flat: list[int] = field(default_factory=list)  # the token ids of every segment, in order
    group_row: list[int] = field(default_factory=list)  # [g] row of group g
    prompt_col: list[int] = field(default_factory=list)  # [g] column of group g's first prompt token
    comp_col: list[list[int]] = field(default_factory=list)  # [g][k] column of completion k's first token
    row_fill: list[int] = field(default_factory=list)  # [r] tokens in row r


def _lay_out_rows(bins: list[list[int]], prompts: list[list[int]], groups: list[list[list[int]]]) -> _RowLayout:
    """Each bin's groups laid out in one row as ``[prompt | completion_0 | completion_1 ...]``."""
    g_count = len(groups)
    layout = _RowLayout(group_row=[0] * g_count, prompt_col=[0] * g_count,
                        comp_col=[[0] * len(groups[g]) for g in range(g_count)])
    for r, members in enumerate(bins):
        col = 0
        for g in members:
            p_len = len(prompts[g])
            layout.group_row[g], layout.prompt_col[g] = r, col
            segs = [(prompts[g], 0)] + [(ids, k + 1) for k, ids in enumerate(groups[g])]
            for ids, kind in segs:
                layout.seg_row.append(r)
                layout.seg_col.append(col)
                layout.seg_len.append(len(ids))
                layout.seg_pos.append(0 if kind == 0 else p_len)
                layout.seg_group.append(g)
                layout.seg_kind.append(kind)
                if kind:
                    layout.comp_col[g][kind - 1] = col
                layout.flat += ids
                col += len(ids)
        layout.row_fill.append(col)
    return layout


def _packed_rows(layout: _RowLayout, r_count: int, width: int, pad_id: int):
    """(R, L) input ids and position ids, the (R, 1, L, L) bool attention mask, and the (n_segments,)
    segment lengths of ``layout``. A completion token sees its prompt and its own earlier tokens; a
    pad token sees itself only."""
    lengths = torch.tensor(layout.seg_len, dtype=torch.long)
    owner, offset = _spans(lengths)
    rows = torch.tensor(layout.seg_row, dtype=torch.long)[owner]
    cols = torch.tensor(layout.seg_col, dtype=torch.long)[owner] + offset
    input_ids = torch.full((r_count, width), pad_id, dtype=torch.long)
    input_ids[rows, cols] = torch.tensor(layout.flat, dtype=torch.long)
    position_ids = torch.zeros((r_count, width), dtype=torch.long)
    position_ids[rows, cols] = torch.tensor(layout.seg_pos, dtype=torch.long)[owner] + offset
    # Pad tokens get a unique negative group id each, so they attend to themselves only.
    group_ids = -1 - torch.arange(width).repeat(r_count, 1)  # (R, L)
    group_ids[rows, cols] = torch.tensor(layout.seg_group, dtype=torch.long)[owner]
    kinds = torch.zeros((r_count, width), dtype=torch.long)  # (R, L)
    kinds[rows, cols] = torch.tensor(layout.seg_kind, dtype=torch.long)[owner]
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (L, L) q >= kv
    same_group = group_ids[:, :, None] == group_ids[:, None, :]  # (R, L, L) [r, q, kv]
    visible_kind = (kinds[:, None, :] == 0) | (kinds[:, None, :] == kinds[:, :, None])
    attention_mask = (same_group & visible_kind & causal).unsqueeze(1)  # (R, 1, L, L)
    return input_ids, position_ids, attention_mask, lengths


def _packed_targets(layout: _RowLayout, prompts: list[list[int]], groups: list[list[list[int]]],
                    train_on_prompt: bool):
    """(N,) token rows, predictor columns, target columns and sequence of every target token,
    sequence by sequence (``s = k * G + g``) in text order: the prompt (``train_on_prompt``), then
    the completion, whose first token the last prompt token predicts."""
    g_count = len(groups)
    # Each span: row, first target column, length, predictor of its first token, sequence.
    span_row, span_col, span_len, span_pred, span_seq = [], [], [], [], []
    for k, g in _sequences(groups):
        s = k * g_count + g
        p_len, c_len = len(prompts[g]), len(groups[g][k])
        row, prompt_col, comp_col = layout.group_row[g], layout.prompt_col[g], layout.comp_col[g][k]
        if train_on_prompt and p_len > 1:
            span_row.append(row)
            span_col.append(prompt_col + 1)
            span_len.append(p_len - 1)
            span_pred.append(prompt_col)
            span_seq.append(s)
        skip = 0 if p_len else 1  # without a prompt nothing predicts the first token
        span_row.append(row)
        span_col.append(comp_col + skip)
        span_len.append(max(c_len - skip, 0))
        span_pred.append(prompt_col + p_len - 1 if p_len else comp_col)
        span_seq.append(s)
    owner, offset = _spans(torch.tensor(span_len, dtype=torch.long))
    token_rows = torch.tensor(span_row, dtype=torch.long)[owner]
    target_cols = torch.tensor(span_col, dtype=torch.long)[owner] + offset
    token_cols = torch.where(offset == 0, torch.tensor(span_pred, dtype=torch.long)[owner], target_cols - 1)
    token_seq = torch.tensor(span_seq, dtype=torch.long)[owner]
    return token_rows, token_cols, target_cols, token_seq
