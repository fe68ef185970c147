"""Batch order: length-grouped and token-budget batches, shards across ranks."""

import pytest

from data.test_collate import _random_examples
from preftune.data.order import batch_indices, shard, token_budget_batches


def _flat(batches):
    return sorted(i for b in batches for i in b)


def test_batch_indices_partition_and_determinism():
    exs = _random_examples(103, seed=1)
    a = batch_indices(exs, 8, shuffle=True, seed=3, epoch=0, mega_batch_factor=4)
    assert _flat(a) == list(range(103))
    assert a == batch_indices(exs, 8, shuffle=True, seed=3, epoch=0, mega_batch_factor=4)
    assert a != batch_indices(exs, 8, shuffle=True, seed=3, epoch=1, mega_batch_factor=4)
    longest = max(range(103), key=lambda i: exs[i].num_tokens)
    assert exs[longest].num_tokens == max(exs[i].num_tokens for i in a[0])  # OOM shows at step 1
    assert sorted(len(b) for b in a)[1:] == [8] * 12
    dropped = batch_indices(exs, 8, seed=3, drop_last=True)
    assert len(dropped) == 12 and all(len(b) == 8 for b in dropped)
    assert batch_indices(exs, 10, shuffle=False, length_grouped=False)[0] == list(range(10))


def test_length_grouping_reduces_padding():
    exs = _random_examples(400, seed=2, max_prompt=60, max_completion=60)

    def waste(batches):
        return sum(len(b) * max(exs[i].num_tokens for i in b) - sum(exs[i].num_tokens for i in b) for b in batches)

    grouped = batch_indices(exs, 8, seed=0, length_grouped=True)
    plain = batch_indices(exs, 8, seed=0, length_grouped=False)
    assert waste(grouped) < 0.5 * waste(plain)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_batches(packed):
    exs = _random_examples(200, seed=4, max_prompt=30, max_completion=30)
    batches = token_budget_batches(exs, max_tokens=300, seed=1, epoch=2, packed=packed)
    assert _flat(batches) == list(range(200))
    assert batches == token_budget_batches(exs, max_tokens=300, seed=1, epoch=2, packed=packed)
    for b in batches:
        if packed:
            cost = sum(exs[i].num_tokens for i in b)
        else:
            cost = sum(len(exs[i].completions) for i in b) * max(
                len(exs[i].prompt_ids) + len(c) for i in b for c in exs[i].completions)
        assert cost <= 300 or len(b) == 1
    if packed:  # balanced: all but a few batches are nearly full
        costs = sorted(sum(exs[i].num_tokens for i in b) for b in batches)
        assert costs[len(costs) // 4] > 0.8 * 300


def test_shard_no_drops_no_duplicates_equal_steps():
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9, 10]]
    shards = [shard(batches, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    assert _flat([b for s in shards for b in s]) == list(range(11))
    assert shards[0][:2] == [[0, 1], [4, 5]]
    shards = [shard(batches, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert _flat([b for s in shards for b in s]) == list(range(11))
    with pytest.raises(ValueError):
        shard(batches, 2, 2)
