"""Reference log-probs: a separate frozen copy, adapters off, and a cache that is never stale."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.data import load_dataset
from preftune.data.collate import collate_packed
from preftune.data.records import TokenizedExample
from preftune.model.loading import add_lora, load_model, load_tokenizer
from preftune.model.logprobs import batch_group_logps, batch_logps, group_logps
from preftune.model.tiny import tiny_model
from preftune.training.reference import (
    AdapterOffReference,
    CachedReference,
    ModelReference,
    SharedReference,
    cache_key,
    check_separate,
    compute_reference_table,
    load_cache,
    save_cache,
)


@pytest.fixture
def examples(tiny_model_dir, rule_data):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return load_dataset(str(rule_data["eval"]), tokenizer, kind="pair", max_length=64, max_prompt_length=32)[0]


def test_reference_must_be_separate(tiny_model_dir):
    """PITFALLS: a reference that is the policy (or shares its tensors) gets the updates: loss stuck at log 2."""
    policy = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="is the policy object itself"):
        check_separate(policy, policy)
    shallow = copy.copy(policy)  # a new object holding the same parameter tensors
    with pytest.raises(ValueError, match="shares .* parameter tensors with the policy"):
        ModelReference(shallow, policy=policy)
    reference = ModelReference(copy.deepcopy(policy), policy=policy)
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert not reference.model.training


def test_cache_key_changes_with_everything_that_changes_the_logps(tiny_model_dir, rule_data, examples):
    model = load_model(str(tiny_model_dir))
    key = cache_key(examples, model, "float32")
    assert cache_key(examples, model, "float32") == key  # deterministic
    assert cache_key(examples, model, "bfloat16") != key  # dtype
    shorter = load_dataset(str(rule_data["eval"]), load_tokenizer(str(tiny_model_dir)), kind="pair",
                           max_length=24, max_prompt_length=16)[0]
    assert cache_key(shorter, model, "float32") != key  # truncation settings (tokenized ids differ)
    edited = copy.deepcopy(examples)
    edited[5].completions[0][-2] += 1  # one token of one completion
    assert cache_key(edited, model, "float32") != key  # data
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3  # one weight of the reference
    assert cache_key(examples, other, "float32") != key  # reference weights


def test_a_cache_under_another_key_is_never_used(tmp_path):
    path = tmp_path / "ref.safetensors"
    table = torch.randn(4, 2)
    save_cache(path, table, key="abc")
    assert torch.equal(load_cache(path, "abc"), table)
    assert load_cache(path, "abd") is None  # stale: recomputed, not trusted
    path.write_bytes(b"not a safetensors file")
    assert load_cache(path, "abc") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_table_equals_live_reference_and_adapters_off_equals_base(tiny_model_dir, examples):
    """The precomputed table holds exactly the live reference's numbers; with LoRA, adapters
    off after training gives the base model's log-probs (the reference really is the start)."""
    base = load_model(str(tiny_model_dir)).eval()
    live = ModelReference(copy.deepcopy(base))
    make_batch = lambda exs: collate_packed(exs, pad_id=0)  # noqa: E731
    table = compute_reference_table(live, examples, make_batch, batch_size=5, progress=False)
    batch = make_batch(examples[:8])
    assert torch.allclose(table[:8].t().reshape(-1), live.logps(batch), atol=1e-4)

    policy = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained: adapters now change the outputs
    adapters_off = AdapterOffReference(policy).logps(batch)
    with torch.no_grad():
        assert torch.allclose(adapters_off, batch_logps(base, batch).logps, atol=1e-4)
        assert not torch.allclose(batch_logps(policy, batch).logps, adapters_off, atol=1e-2)


def test_every_reference_gives_group_logps():
    """Response groups (k = 4, 2, 3): the live reference, adapters off and the precomputed table give the
    same (G, K) log-probs as the base model's one forward per group; the table is (num_examples, K_max) and a
    batch of smaller K reads its first K columns; absent responses are 0 and masked."""
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=gen).tolist()

    examples = [TokenizedExample(index=i, prompt_ids=ids(3 + i), completions=[ids(2 + j + i) for j in range(k)],
                                 scores=[float(j % 2) for j in range(k)]) for i, k in enumerate([4, 2, 3, 2])]
    base = tiny_model("llama", vocab_size=256).eval()
    make_batch = lambda exs: collate_packed(exs, pad_id=0)  # noqa: E731
    batch = make_batch(examples)
    with torch.no_grad():
        expected = batch_group_logps(base, batch)
    live = ModelReference(copy.deepcopy(base))
    got = group_logps(live.logps(batch), batch)
    assert torch.equal(got.mask, expected.mask) and (got.logps - expected.logps).abs().max() < 1e-5
    assert (got.mean_logps - expected.mean_logps).abs().max() < 1e-5

    table = compute_reference_table(live, examples, make_batch, batch_size=2, progress=False)
    assert table.shape == (4, 4)
    assert (table - expected.logps).abs().max() < 1e-4 and (table[1, 2:] == 0).all()
    cached = CachedReference(table)
    for part in (examples, examples[1::2]):  # K = 4, and K = 2 (groups of two only)
        part_batch = make_batch(part)
        assert (cached.logps(part_batch) - live.logps(part_batch)).abs().max() < 1e-4

    policy = add_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapters_off = group_logps(AdapterOffReference(policy).logps(batch), batch)
    assert (adapters_off.logps - expected.logps).abs().max() < 1e-4
    with torch.no_grad():
        assert (batch_group_logps(policy, batch).logps - expected.logps).abs().max() > 1e-2


class CountingReference(ModelReference):
    """A live reference that counts the rows it computes."""

    rows = 0

    def logps(self, batch):
        self.rows += batch.num_groups
        return super().logps(batch)


def test_a_shared_cache_computes_each_row_once_across_runs(tiny_model_dir, examples, tmp_path):
    """The first run over some batches computes their rows (whole batches, as the live reference does: equal
    numbers); a second run on the same path computes none of them, only the rows it lacks (a batch of just
    those); a file under another key, torn or foreign is never read; every number equals the live reference's."""
    base = load_model(str(tiny_model_dir)).eval()
    make_batch = lambda exs: collate_packed(exs, pad_id=0)  # noqa: E731
    path = tmp_path / "cache" / "shared-k.safetensors"
    live = ModelReference(copy.deepcopy(base))
    first = SharedReference(CountingReference(copy.deepcopy(base)), examples, make_batch, path, "k")
    for part in (examples[:8], examples[8:16]):
        batch = make_batch(part)
        assert (first.logps(batch) - live.logps(batch)).abs().max() <= 1e-6
    assert first.live.rows == first.computed == 16 and first.reused == 0 and path.exists()
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left

    second = SharedReference(CountingReference(copy.deepcopy(base)), examples, make_batch, path, "k")
    assert int(second.known.sum()) == 16
    batch = make_batch(examples[4:20])  # 12 rows stored, 4 not
    assert (second.logps(batch) - live.logps(batch)).abs().max() <= 1e-5
    assert second.live.rows == second.computed == 4 and second.reused == 12
    for part in (examples[:8], examples[8:16], examples[4:20]):
        second.logps(make_batch(part))
    assert second.live.rows == 4  # nothing computed twice

    first.logps(make_batch(examples[16:24]))  # the first run learns the second's rows from the file
    assert first.live.rows == 16 + 4 and int(first.known.sum()) == 24

    other = SharedReference(CountingReference(copy.deepcopy(base)), examples, make_batch, path, "other-key")
    assert int(other.known.sum()) == 0
    path.write_bytes(b"torn")
    torn = SharedReference(CountingReference(copy.deepcopy(base)), examples, make_batch, path, "k")
    assert int(torn.known.sum()) == 0
    torn.logps(make_batch(examples[:8]))
    assert torn.live.rows == 8


def test_lora_runs_sharing_the_reference_train_as_a_live_reference_does(tiny_model_dir, rule_data, tmp_path,
                                                                         monkeypatch):
    """Two LoRA runs with --share-ref-cache (the adapters-off reference behind the table; a frozen copy is
    tested by the sweep's test): the first computes each row once (its held-out rows at the first in-loop pass
    only), the second none, and both log the losses of a run without it (within 1e-6, fp32); the training rows
    have their own table, so a run without held-out data reads them too."""
    import json

    from preftune.config.train_config import TrainConfig
    from preftune.training.loop import train

    computed = []
    real = AdapterOffReference.logps
    monkeypatch.setattr(AdapterOffReference, "logps", lambda self, batch: computed.append(batch.num_groups) or real(self, batch))

    def run(name, eval_data=str(rule_data["eval"]), **options):
        computed.clear()
        train(TrainConfig(model=str(tiny_model_dir), data=str(rule_data["train"]), eval_data=eval_data,
                          output_dir=str(tmp_path / name), loss="dpo", learning_rate=3e-3, batch_size=8,
                          max_steps=3, max_length=64, max_prompt_length=32, logging_steps=1, eval_steps=2,
                          seed=0, progress=False, lora_r=4, ref_cache_dir=str(tmp_path / "cache"), **options))
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return sum(computed), [value for row in rows for key, value in sorted(row.items()) if "loss" in key]

    plain_rows, plain = run("plain")
    first_rows, first = run("first", share_ref_cache=True)
    second_rows, second = run("second", share_ref_cache=True)
    assert plain_rows == 3 * 8 + 3 * 64 and first_rows == 3 * 8 + 64 and second_rows == 0
    assert len(plain) == len(first) == len(second) == 6  # 3 training rows and 3 held-out passes
    assert max(abs(a - b) for a, b in zip(plain, first)) <= 1e-6
    assert max(abs(a - b) for a, b in zip(plain, second)) <= 1e-6
    assert [p.name.startswith("shared-") for p in (tmp_path / "cache").iterdir()] == [True, True]
    assert run("no-held-out", eval_data=None, share_ref_cache=True)[0] == 0
