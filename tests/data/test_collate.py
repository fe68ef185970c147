"""Collation into the Batch contract (padded and packed prefix-shared).

The hand-made batch used throughout (pad id 0)::

    group 0 (index 7):  prompt [10 11]   chosen [20 21]      rejected [30]
    group 1 (index 8):  prompt [12]      chosen [22 23 24]   rejected [31 32]

Sequences s = k * G + g: 0 = chosen of group 0, 1 = chosen of group 1, 2 = rejected of
group 0, 3 = rejected of group 1.
"""

import pytest
import torch

from preftune.data.collate import collate_packed, collate_padded, first_fit_decreasing
from preftune.data.records import TokenizedExample


def two_groups():
    return [
        TokenizedExample(index=7, prompt_ids=[10, 11], completions=[[20, 21], [30]]),
        TokenizedExample(index=8, prompt_ids=[12], completions=[[22, 23, 24], [31, 32]]),
    ]


def t(rows):
    return torch.tensor(rows)


def test_padded_exact():
    b = collate_padded(two_groups(), pad_id=0)
    # rows: s0 = [10 11 20 21], s1 = [12 22 23 24], s2 = [10 11 30], s3 = [12 31 32]
    assert torch.equal(b.input_ids, t([[10, 11, 20, 21], [12, 22, 23, 24], [10, 11, 30, 0], [12, 31, 32, 0]]))
    assert torch.equal(b.attention_mask, t([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]))
    assert torch.equal(b.position_ids, torch.arange(4).repeat(4, 1))
    # target at col c is predicted by col c - 1
    assert torch.equal(b.token_rows, t([0, 0, 1, 1, 1, 2, 3, 3]))
    assert torch.equal(b.token_cols, t([1, 2, 0, 1, 2, 1, 0, 1]))
    assert torch.equal(b.token_targets, t([20, 21, 22, 23, 24, 30, 31, 32]))
    assert torch.equal(b.token_seq, t([0, 0, 1, 1, 1, 2, 3, 3]))
    assert torch.equal(b.example_index, t([7, 8]))
    assert (b.num_groups, b.num_completions, b.packed, b.num_tokens, b.labels) == (2, 2, False, 14, None)


def test_packed_exact_two_rows():
    # Group lengths 5 and 6; pack_tokens=None -> rows of 6, group 1 (longer) first.
    b = collate_packed(two_groups(), pad_id=0)
    assert torch.equal(b.input_ids, t([[12, 22, 23, 24, 31, 32], [10, 11, 20, 21, 30, 0]]))
    # completions restart at the end of the prompt; pad position 0
    assert torch.equal(b.position_ids, t([[0, 1, 2, 3, 1, 2], [0, 1, 2, 3, 2, 0]]))
    assert b.attention_mask.shape == (2, 1, 6, 6) and b.attention_mask.dtype == torch.bool
    assert torch.equal(b.attention_mask[0, 0].int(), t([
        [1, 0, 0, 0, 0, 0],  # 12
        [1, 1, 0, 0, 0, 0],  # 22
        [1, 1, 1, 0, 0, 0],  # 23
        [1, 1, 1, 1, 0, 0],  # 24
        [1, 0, 0, 0, 1, 0],  # 31: prompt + itself, not the chosen tokens
        [1, 0, 0, 0, 1, 1],  # 32
    ]))
    assert torch.equal(b.attention_mask[1, 0].int(), t([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # 30
        [0, 0, 0, 0, 0, 1],  # pad: itself only
    ]))
    # sequence order, text order; the first token of each completion is predicted by the
    # last prompt token (row 0 col 0 for group 1, row 1 col 1 for group 0)
    assert torch.equal(b.token_rows, t([1, 1, 0, 0, 0, 1, 0, 0]))
    assert torch.equal(b.token_cols, t([1, 2, 0, 1, 2, 1, 0, 4]))
    assert torch.equal(b.token_targets, t([20, 21, 22, 23, 24, 30, 31, 32]))
    assert torch.equal(b.token_seq, t([0, 0, 1, 1, 1, 2, 3, 3]))
    assert (b.packed, b.num_tokens, b.num_groups, b.num_completions) == (True, 11, 2, 2)


def test_packed_exact_one_row():
    b = collate_packed(two_groups(), pad_id=0, pack_tokens=11)
    assert torch.equal(b.input_ids, t([[12, 22, 23, 24, 31, 32, 10, 11, 20, 21, 30]]))
    assert torch.equal(b.position_ids, t([[0, 1, 2, 3, 1, 2, 0, 1, 2, 3, 2]]))
    mask = b.attention_mask[0, 0]
    assert not mask[6:, :6].any() and not mask[:6, 6:].any()  # groups never see each other
    assert torch.equal(mask[10].int(), t([0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1]))
    assert torch.equal(b.token_cols, t([7, 8, 0, 1, 2, 7, 0, 4]))
    assert torch.equal(b.token_targets, t([20, 21, 22, 23, 24, 30, 31, 32]))


def test_pad_to_multiple_of():
    b = collate_packed(two_groups(), pad_id=0, pad_to_multiple_of=8)
    assert b.input_ids.shape == (2, 8)
    assert torch.equal(b.attention_mask[0, 0, 7].int(), t([0] * 7 + [1]))
    assert collate_padded(two_groups(), pad_id=0, pad_to_multiple_of=8).input_ids.shape == (4, 8)


def test_train_on_prompt_targets_all_but_first_token():
    padded = collate_padded(two_groups(), pad_id=0, train_on_prompt=True)
    packed = collate_packed(two_groups(), pad_id=0, train_on_prompt=True)
    expected = t([11, 20, 21, 22, 23, 24, 11, 30, 31, 32])
    for b in (padded, packed):
        assert torch.equal(b.token_targets, expected)
        assert torch.equal(b.token_seq, t([0, 0, 0, 1, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(padded.input_ids[padded.token_rows, padded.token_cols + 1], expected)
    # packed (rows [12 22 23 24 31 32], [10 11 20 21 30 _]): prompt token 11 predicted by 10 twice
    assert torch.equal(packed.token_cols, t([0, 1, 2, 0, 1, 2, 0, 1, 0, 4]))


def test_no_prompt_skips_first_token():
    ex = [TokenizedExample(index=0, prompt_ids=[], completions=[[5, 6, 7]])]
    for b in (collate_padded(ex, 0), collate_packed(ex, 0)):
        assert torch.equal(b.token_targets, t([6, 7]))
        assert torch.equal(b.token_cols, t([0, 1]))


def test_kl_completions_layout():
    exs = [TokenizedExample(index=i, prompt_ids=[10 + i], completions=[[20 + i, 30 + i]], label=i % 2 == 0)
           for i in range(3)]
    for collate in (collate_padded, collate_packed):
        b = collate(exs, 0, kl_completions=True)
        assert (b.num_groups, b.num_completions) == (3, 2)
        assert torch.equal(b.labels, t([True, False, True]))
        for s in range(6):
            k, g = divmod(s, 3)
            donor = g if k == 0 else (g + 1) % 3  # KL sequence g: completion of group g + 1
            assert b.token_targets[b.token_seq == s].tolist() == [20 + donor, 30 + donor]
    packed = collate_packed(exs, 0, kl_completions=True, pack_tokens=100)
    # group 0 laid out once: prompt, own completion, group 1's completion
    assert packed.input_ids[0, :5].tolist() == [10, 20, 30, 21, 31]
    assert packed.position_ids[0, :5].tolist() == [0, 1, 2, 1, 2]


def _random_examples(n, seed, k=2, max_prompt=12, max_completion=9):
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 100, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen).tolist()

    return [TokenizedExample(index=100 + i, prompt_ids=ids(1, max_prompt), completions=[ids(1, max_completion)
            for _ in range(k)]) for i in range(n)]


def assert_each_target_sees_its_sequence(b, exs) -> None:
    """For every target token of batch ``b``: the positions its predictor attends to, in order, hold its
    example's prompt + completion[:j] at positions 0..P+j-1, and the target is the next token of that text."""
    for i in range(len(b.token_seq)):
        k, g = divmod(int(b.token_seq[i]), len(exs))
        r, c = int(b.token_rows[i]), int(b.token_cols[i])
        visible = b.attention_mask[r, 0, c].nonzero().flatten()
        text = exs[g].prompt_ids + exs[g].completions[k]
        assert b.input_ids[r, visible].tolist() == text[:len(visible)]
        assert b.position_ids[r, visible].tolist() == list(range(len(visible)))
        assert text[len(visible)] == int(b.token_targets[i])


@pytest.mark.parametrize("pack_tokens", [None, 16, 40, 1000])
def test_packed_each_target_sees_exactly_its_sequence(pack_tokens):
    """For every target token, the positions its predictor attends to, in order, are exactly
    prompt + completion[:j] with positions 0..P+j-1: the unpacked sequence."""
    exs = _random_examples(9, seed=pack_tokens or 0)
    b = collate_packed(exs, 0, pack_tokens=pack_tokens)
    padded = collate_padded(exs, 0)
    assert torch.equal(b.token_targets, padded.token_targets)
    assert torch.equal(b.token_seq, padded.token_seq)
    assert_each_target_sees_its_sequence(b, exs)
    if pack_tokens:
        fill = (b.attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) & (b.input_ids != 0)).sum(-1)
        assert (fill <= max(pack_tokens, max(e.num_tokens for e in exs))).all()


def test_collate_errors():
    with pytest.raises(ValueError, match="empty list"):
        collate_padded([], 0)
    mixed = [TokenizedExample(0, [1], [[2]]), TokenizedExample(1, [1], [[2], [3]])]
    with pytest.raises(ValueError, match="same number of completions"):
        collate_packed(mixed, 0)
    with pytest.raises(ValueError, match="exactly one completion"):
        collate_padded(two_groups(), 0, kl_completions=True)
    empty = [TokenizedExample(5, [1, 2], [[3], []])]
    for collate in (collate_padded, collate_packed):
        with pytest.raises(ValueError, match="example 5: completion 1 has no target token"):
            collate(empty, 0)


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 6, 3, 2, 9], 9) == [[4], [1, 2], [0, 3]]
    assert first_fit_decreasing([12, 1], 4) == [[0], [1]]  # too long: a bin alone


def test_row_capacity_trades_padding_against_masked_attention():
    """Groups of 100, 70, 30, 20 tokens (total 220). Rows as long as the longest group (100): first fit
    decreasing gives [100], [70, 30], [20] -> 3 rows x 100 = 300 positions; one row of 220 holds all.
    Cost = rows x width x (1 + c x width): 3 rows: 300 + 30,000 c; one row: 220 + 48,400 c; they are equal
    at c = 80 / 18,400 = 0.00435. So c = 0 and c = 0.001 (330 vs 268.4) choose 220, c = 0.01 (600 vs 704)
    keeps 100; a mask bound of 40,000 elements (one row's 220^2 = 48,400 exceeds it) keeps 100 too."""
    from preftune.data.collate import attention_cost, choose_row_capacity

    lengths = [100, 70, 30, 20]
    assert choose_row_capacity(lengths, 0.0) == 220
    assert choose_row_capacity(lengths, 0.001) == 220
    assert choose_row_capacity(lengths, 0.01) == 100
    assert choose_row_capacity(lengths, 0.0, max_mask_elements=40_000) == 100
    # SmolLM2-135M: 4 x 576 / (2 x (4 x 576^2 + 3 x 576 x 1536)) = 2304 / 7,962,624 = 2.894e-4
    assert attention_cost(576, 1536) == pytest.approx(2.894e-4, rel=1e-3)


def test_row_cost_layout_puts_groups_longer_than_half_a_row_together():
    """Groups of 100, 60, 55, 40 tokens: rows of the longest group hold [100], [60, 40], [55] (300 positions,
    45 of them padding); at c = 1e-4 one row of 255 costs 255 x 1.0255 = 261.5 < 300 x 1.01 = 303, at
    c = 1e-2 it costs 905 > 600. The packed log-probs of such layouts equal the padded ones
    (tests/model/test_logprobs.py::test_packed_padded_naive_agree, "packed_one_row")."""
    examples = [TokenizedExample(index=i, prompt_ids=[7] * p, completions=[[5] * c, [6] * c])
                for i, (p, c) in enumerate([(40, 30), (20, 20), (15, 20), (10, 15)])]
    plain = collate_packed(examples, 0)
    assert plain.input_ids.shape == (3, 100) and plain.num_tokens == 255
    assert collate_packed(examples, 0, row_cost=1e-4).input_ids.shape == (1, 255)
    assert collate_packed(examples, 0, row_cost=1e-2).input_ids.shape == (3, 100)


# ----------------------------------------------------------------------------- response groups


def two_response_groups():
    """Group 0: prompt [10 11], responses [20 21], [30], [40 41 42] (k = 3); group 1: prompt [12],
    responses [22], [31 32] (k = 2). K = 3: sequences 0, 1 (k = 0), 2, 3 (k = 1), 4 (k = 2 of group 0);
    sequence 5 (k = 2 of group 1) is absent."""
    return [
        TokenizedExample(index=7, prompt_ids=[10, 11], completions=[[20, 21], [30], [40, 41, 42]], scores=[1, 0, 2]),
        TokenizedExample(index=8, prompt_ids=[12], completions=[[22], [31, 32]], scores=[0.5, 0.5]),
    ]


def test_packed_group_exact():
    b = collate_packed(two_response_groups(), pad_id=0, pack_tokens=100)
    # one row: [prompt | r0 | r1 | r2] of group 0 (9 tokens, longest first), then group 1's
    assert torch.equal(b.input_ids, t([[10, 11, 20, 21, 30, 40, 41, 42, 12, 22, 31, 32]]))
    assert torch.equal(b.position_ids, t([[0, 1, 2, 3, 2, 2, 3, 4, 0, 1, 1, 2]]))  # each from the prompt end
    mask = b.attention_mask[0, 0].int()
    assert torch.equal(mask[7], t([1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]))  # 42: prompt + its own response
    assert torch.equal(mask[4], t([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]))  # 30: not 20 21
    assert torch.equal(mask[11], t([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1]))  # 32: group 1 only, not 22
    assert torch.equal(b.token_targets, t([20, 21, 22, 30, 31, 32, 40, 41, 42]))
    assert torch.equal(b.token_seq, t([0, 0, 1, 2, 3, 3, 4, 4, 4]))
    assert torch.equal(b.token_cols, t([1, 2, 8, 1, 8, 10, 1, 5, 6]))  # first tokens from the last prompt token
    assert torch.equal(b.token_target_cols, t([2, 3, 9, 4, 10, 11, 5, 6, 7]))  # where each target sits
    assert torch.equal(b.input_ids[0, b.token_target_cols], b.token_targets)
    assert (b.num_groups, b.num_completions, b.num_tokens) == (2, 3, 12)
    assert torch.equal(b.scores, t([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]))
    assert torch.equal(b.completion_mask, t([[True, True, True], [True, True, False]]))


def test_padded_group_has_no_row_for_an_absent_response():
    b = collate_padded(two_response_groups(), pad_id=0)
    assert torch.equal(b.input_ids, t([[10, 11, 20, 21, 0], [12, 22, 0, 0, 0], [10, 11, 30, 0, 0],
                                       [12, 31, 32, 0, 0], [10, 11, 40, 41, 42]]))
    assert torch.equal(b.token_rows, t([0, 0, 1, 2, 3, 3, 4, 4, 4]))
    assert torch.equal(b.token_seq, t([0, 0, 1, 2, 3, 3, 4, 4, 4]))
    assert torch.equal(b.token_targets, t([20, 21, 22, 30, 31, 32, 40, 41, 42]))
    assert torch.equal(b.completion_mask, collate_packed(two_response_groups(), 0).completion_mask)
    assert b.num_completions == 3 and b.num_tokens == 17


@pytest.mark.parametrize("pack_tokens", [None, 20, 1000])
def test_packed_groups_each_target_sees_exactly_its_sequence(pack_tokens):
    """Groups of k = 2..5: every target's predictor attends to exactly prompt + response[:j], positions
    0..P+j-1, as in the unpacked sequence; the padded layout lists the same targets."""
    gen = torch.Generator().manual_seed(5)
    exs = []
    for i, k in enumerate([2, 5, 3, 4, 2, 5]):
        ex = _random_examples(1, seed=100 + i, k=k)[0]
        exs.append(TokenizedExample(index=i, prompt_ids=ex.prompt_ids, completions=ex.completions,
                                    scores=torch.rand(k, generator=gen).tolist()))
    b = collate_packed(exs, 0, pack_tokens=pack_tokens)
    padded = collate_padded(exs, 0)
    assert torch.equal(b.token_targets, padded.token_targets) and torch.equal(b.token_seq, padded.token_seq)
    assert_each_target_sees_its_sequence(b, exs)


def test_group_errors():
    bad = [TokenizedExample(0, [1], [[2], [3]], scores=[1.0])]
    with pytest.raises(ValueError, match="example 0: 1 scores for 2 completions"):
        collate_packed(bad, 0)
    # pairs and groups mixed: a group of two would silently become a pair whose first response is "chosen"
    for k in (2, 3):
        mixed = [TokenizedExample(0, [1], [[2], [3]]),
                 TokenizedExample(1, [1], [[2], [3], [4]][:k], scores=[1, 2, 3][:k])]
        with pytest.raises(ValueError, match="a batch mixes response groups"):
            collate_padded(mixed, 0)
    empty = [TokenizedExample(5, [1, 2], [[3], [4], []], scores=[1, 2, 3]), TokenizedExample(6, [1], [[2], [3]],
                                                                                             scores=[1, 2])]
    for collate in (collate_padded, collate_packed):
        with pytest.raises(ValueError, match="example 5: completion 2 has no target token"):
            collate(empty, 0)
