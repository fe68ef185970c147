"""Response groups in one forward: ``[prompt | r_0 | ... | r_{k-1}]`` == each response alone.

The acceptance test of issue 29, item 2: every response's summed and token-averaged log-probs, (G, K)
with a validity mask for groups of different k, and the parameter gradients of a loss over both,
agree to 1e-4 (fp32) between the packed layout (groups alone in rows, several groups in one row),
the padded fallback and separate full-model forwards of prompt + response, on every architecture
packing is claimed for: Llama, Qwen2, Mistral with a sliding window that bites, and GPT-2 (absolute
position embeddings).
"""

import pytest
import torch
from transformers import LlamaModel

from preftune.data.collate import collate_packed, collate_padded
from preftune.data.records import TokenizedExample
from preftune.model.logprobs import GroupLogps, batch_group_logps, group_logps, per_group
from preftune.model.packing import scoring_collate, supports_packing
from preftune.model.tiny import tiny_model

VOCAB = 512
ARCHS = [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", dict(sliding_window=6)),  # responses run past the window: folded into the packed mask
    ("gpt2", {}),  # absolute position embeddings
]


def make_groups(seed=0):
    """Three groups of k = 4, 2 and 3 responses (K = 4), prompts of 5, 30 and 1 tokens, responses of
    1 to 20 tokens."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return [
        TokenizedExample(index=0, prompt_ids=ids(5), completions=[ids(12), ids(1), ids(20), ids(7)],
                         scores=[3.0, 1.0, 4.0, 1.0]),
        TokenizedExample(index=1, prompt_ids=ids(30), completions=[ids(4), ids(9)], scores=[0.0, 2.5]),
        TokenizedExample(index=2, prompt_ids=ids(1), completions=[ids(8), ids(3), ids(15)], scores=[1.0, 2.0, 3.0]),
    ]


def model_for(arch, attn="sdpa", **config):
    return tiny_model(arch, vocab_size=VOCAB, attn_implementation=attn, **config).eval()  # eval: no dropout


def separate_logps(model, examples):
    """(G, K) summed and averaged log-probs and the mask, each response run alone (prompt + response)
    through the full model (its own logits, plain autograd)."""
    k_max = max(len(ex.completions) for ex in examples)
    summed = [[torch.zeros(()) for _ in range(k_max)] for _ in examples]
    mean = [[torch.zeros(()) for _ in range(k_max)] for _ in examples]
    mask = torch.zeros(len(examples), k_max, dtype=torch.bool)
    for g, ex in enumerate(examples):
        for k, response in enumerate(ex.completions):
            ids = torch.tensor([ex.prompt_ids + response])
            logp = model(ids).logits[0].log_softmax(-1)  # (T, V)
            p_len = len(ex.prompt_ids)
            tokens = logp[p_len - 1:-1].gather(1, ids[0, p_len:, None])[:, 0]
            summed[g][k], mean[g][k], mask[g, k] = tokens.sum(), tokens.mean(), True
    return torch.stack([torch.stack(row) for row in summed]), torch.stack([torch.stack(row) for row in mean]), mask


def group_loss(summed, mean, mask):
    """A loss reading summed and averaged log-probs of every valid response with different weights."""
    weights = torch.linspace(0.5, 2.0, summed.numel()).view(summed.shape)
    return ((weights * summed + 3.0 * mean) * mask).sum()


def values_and_grads(model, run):
    model.zero_grad()
    summed, mean, mask = run()
    group_loss(summed, mean, mask).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return summed.detach(), mean.detach(), mask, grads


def assert_grads_close(grads, ref, rtol=1e-4):
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        scale = ref[name].norm()
        assert (g - ref[name]).norm() <= rtol * scale + 1e-12, f"{name}: {(g - ref[name]).norm() / scale:.2e}"


def one_forward(model, batch):
    out = batch_group_logps(model, batch, chunk_size=16)
    return out.logps, out.mean_logps, out.mask


def layouts(examples):
    total = sum(ex.num_tokens for ex in examples)
    return {
        "packed": collate_packed(examples, 0),  # rows as long as the longest group
        "packed_one_row": collate_packed(examples, 0, pack_tokens=total),  # all groups share one row
        "packed_tight": collate_packed(examples, 0, pack_tokens=46),  # groups 0 (45) and 2 (27) apart
        "padded": collate_padded(examples, 0),  # the fallback: one row per response
    }


@pytest.mark.parametrize("arch,config", ARCHS)
def test_one_forward_per_group_equals_separate_forwards(arch, config):
    model = model_for(arch, **config)
    assert supports_packing(model)[0]
    examples = make_groups()
    ref_sum, ref_mean, ref_mask, ref_grads = values_and_grads(model, lambda: separate_logps(model, examples))
    batches = layouts(examples)
    assert batches["packed_one_row"].input_ids.shape[0] == 1
    assert batches["padded"].input_ids.shape[0] == 9  # 4 + 2 + 3 responses: no row for absent ones
    for name, batch in batches.items():
        summed, mean, mask, grads = values_and_grads(model, lambda: one_forward(model, batch))
        assert summed.shape == mean.shape == mask.shape == (3, 4), name
        assert torch.equal(mask, ref_mask), name
        assert (summed - ref_sum).abs().max() < 1e-4, name
        assert (mean - ref_mean).abs().max() < 1e-4, name
        assert_grads_close(grads, ref_grads)


def test_the_window_bites_and_positions_continue_from_the_prompt():
    """Mistral's window of 6 changes the numbers (so the packed mask really folds it in), and each
    response's positions start where the prompt ends, as in its separate forward."""
    examples = make_groups(1)
    windowed, plain = model_for("mistral", sliding_window=6), model_for("mistral")
    with torch.no_grad():
        assert (separate_logps(windowed, examples)[0] - separate_logps(plain, examples)[0]).abs().max() > 1e-2
    batch = collate_packed(examples, 0, pack_tokens=10_000)
    col = 0
    for ex in sorted(examples, key=lambda e: -e.num_tokens):  # first-fit-decreasing order in the row
        p_len = len(ex.prompt_ids)
        assert batch.position_ids[0, col:col + p_len].tolist() == list(range(p_len))
        col += p_len
        for response in ex.completions:
            assert batch.position_ids[0, col:col + len(response)].tolist() == list(range(p_len, p_len + len(response)))
            col += len(response)


def test_absent_responses_are_zero_and_masked():
    examples = make_groups()
    model = model_for("llama")
    with torch.no_grad():
        for batch in layouts(examples).values():
            out = batch_group_logps(model, batch)
            assert isinstance(out, GroupLogps)
            assert out.mask.tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]
            assert out.counts.tolist() == [[12, 1, 20, 7], [4, 9, 0, 0], [8, 3, 15, 0]]
            assert (out.logps[~out.mask] == 0).all() and (out.mean_logps[~out.mask] == 0).all()
            assert torch.isfinite(out.mean_logps).all()
            assert torch.equal(batch.scores, torch.tensor([[3.0, 1, 4, 1], [0, 2.5, 0, 0], [1, 2, 3, 0]]))
            assert torch.equal(batch.completion_mask, out.mask)


def test_a_group_forward_computes_the_prompt_once():
    """Packed: each prompt once plus every response (36 + 79 tokens); padded: the prompt again with every
    response (4 x 5 + 40, 2 x 30 + 13, 3 x 1 + 26)."""
    examples = make_groups()
    assert collate_packed(examples, 0).num_tokens == sum(ex.num_tokens for ex in examples) == 36 + 79
    assert collate_padded(examples, 0).num_tokens == sum(ex.padded_tokens for ex in examples) == 60 + 73 + 29


def test_the_padded_fallback_of_a_model_that_cannot_pack():
    """A body that ignores the 4D mask is refused packing; its batch builder pads, and the groups'
    log-probs still equal separate forwards."""

    class MaskIgnoringLlamaModel(LlamaModel):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=None, position_ids=position_ids, **kwargs)

    model = model_for("llama")
    model.model.__class__ = MaskIgnoringLlamaModel
    examples = make_groups(2)
    batch = scoring_collate(model, pad_id=0)(examples)
    assert not batch.packed
    with torch.no_grad():
        ref_sum, ref_mean, _ = separate_logps(model, examples)
        out = batch_group_logps(model, batch)
    assert (out.logps - ref_sum).abs().max() < 1e-4 and (out.mean_logps - ref_mean).abs().max() < 1e-4


def test_per_group_and_pairs():
    """``s = k * G + g`` -> ``[g, k]``; a pair batch is a group batch of K = 2 with every entry valid."""
    values = torch.arange(6.0)  # G = 3, K = 2
    assert per_group(values, 3).tolist() == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        per_group(values, 4)
    pairs = [TokenizedExample(index=i, prompt_ids=[5 + i, 6], completions=[[7, 8], [9]]) for i in range(3)]
    batch = collate_packed(pairs, 0)
    assert batch.scores is None and batch.completion_mask is None
    out = group_logps(torch.arange(6.0), batch)
    assert out.mask.all() and out.counts.tolist() == [[2, 1]] * 3
    assert out.mean_logps.tolist() == [[0.0, 3.0], [0.5, 4.0], [1.0, 5.0]]


def test_a_reward_model_scores_every_response_of_groups_of_different_k():
    """A reward model's head on each response's last token: packed and padded group batches give the
    classifier's own score of prompt + response alone; absent responses score 0."""
    from transformers import AutoModelForSequenceClassification

    from preftune.model.logprobs import batch_logps
    from preftune.model.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", VOCAB, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    examples = make_groups(3)
    with torch.no_grad():
        own = torch.zeros(3, 4)
        for g, ex in enumerate(examples):
            for k, response in enumerate(ex.completions):
                own[g, k] = model(input_ids=torch.tensor([ex.prompt_ids + response])).logits[0, 0]
        for batch in (collate_packed(examples, 0, pack_tokens=10_000), collate_padded(examples, 0)):
            rewards = per_group(batch_logps(model, batch).rewards, 3)
            assert (rewards - own).abs().max() < 1e-5
    assert float(own[own != 0].std()) > 0.01
