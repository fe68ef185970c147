"""One step's objective on response groups: one forward per group through the policy and the reference,
equal to the same groups expanded into pair records; ``preftune train`` on a group file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ranked_rule_groups, write_jsonl

from preftune.config.train_config import TrainConfig
from preftune.data.collate import collate_packed, collate_padded
from preftune.data.records import TokenizedExample
from preftune.methods.objective import compute_objective
from preftune.model.logprobs import LogpOutput, LogProbModel
from preftune.model.tiny import tiny_model
from preftune.training.loop import train
from preftune.training.reference import ModelReference
from preftune.training.step import batch_objective


def groups_and_pairs(seed=0):
    """Groups of k = 4, 3 and 2 with a tie, and the same groups as pair records: every ordered pair
    (better, worse), ties skipped, in the group's order (``--group-pairs all``)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=gen).tolist()

    groups = [TokenizedExample(index=0, prompt_ids=ids(6), completions=[ids(5), ids(9), ids(2), ids(7)],
                               scores=[2.0, 0.0, 2.0, 1.0]),
              TokenizedExample(index=1, prompt_ids=ids(12), completions=[ids(3), ids(8), ids(4)], scores=[0, 1, 3]),
              TokenizedExample(index=2, prompt_ids=ids(2), completions=[ids(6), ids(6)], scores=[5.0, 4.5])]
    pairs = []
    for ex in groups:
        for i, better in enumerate(ex.scores):
            for j, worse in enumerate(ex.scores):
                if better > worse:
                    pairs.append(TokenizedExample(index=len(pairs), prompt_ids=ex.prompt_ids,
                                                  completions=[ex.completions[i], ex.completions[j]]))
    return groups, pairs


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("collate", [collate_packed, collate_padded])
def test_group_objective_equals_the_expanded_pairs(loss, collate):
    """The loss, its gradient and the pair metrics of a group batch (one forward per group) equal those of
    its 5 + 3 + 1 = 9 expanded pairs (a forward per pair) within 1e-5: summed (dpo), averaged (ipo) and
    reference-free (simpo) log-probs."""
    groups, pairs = groups_and_pairs()
    assert len(pairs) == 9
    cfg = TrainConfig(model="tiny", data="groups.jsonl", loss=loss, beta=2.0 if loss == "simpo" else 0.1)
    policy = tiny_model("llama", vocab_size=256, seed=0).eval()
    start = copy.deepcopy(policy)
    with torch.no_grad():  # a policy a little away from the reference: rewards are not all 0
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = ModelReference(start, policy=policy) if cfg.needs_reference else None
    outcomes = []
    for examples in (groups, pairs):
        policy.zero_grad()
        loss_value, metrics = batch_objective(cfg, collate(examples, pad_id=0), LogProbModel(policy), reference)
        loss_value.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        outcomes.append((loss_value.detach(), metrics, grads))
    (group_loss, group_metrics, group_grads), (pair_loss, pair_metrics, pair_grads) = outcomes
    assert abs(float(group_loss - pair_loss)) < 1e-5
    assert (group_grads - pair_grads).norm() <= 1e-4 * pair_grads.norm()
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(group_metrics[key]) == pytest.approx(float(pair_metrics[key]), abs=1e-4), key


def test_train_on_a_group_file_with_a_pair_loss(tiny_model_dir, tmp_path):
    """``preftune train --data groups.jsonl --loss dpo``: the group file is read as groups, each group one
    forward, DPO on its ordered pairs; held-out pairwise accuracy goes from 0 to >= 0.9 in 16 steps. The
    precomputed reference gives the live reference's losses."""
    data = write_jsonl(tmp_path / "groups.jsonl", ranked_rule_groups(128, seed=1))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", ranked_rule_groups(32, seed=2))
    common = dict(model=str(tiny_model_dir), data=str(data), eval_data=str(held_out), loss="dpo", beta=0.1,
                  learning_rate=3e-3, batch_size=8, epochs=1, max_length=64, logging_steps=4, warmup_ratio=0.0,
                  lr_scheduler="constant", seed=0, progress=False)
    result = train(TrainConfig(output_dir=str(tmp_path / "live"), **common))
    assert result.steps == 16
    assert result.eval_before["rewards/accuracies"] == 0.0  # policy == reference
    assert result.eval_after["rewards/accuracies"] >= 0.9
    cached = train(TrainConfig(output_dir=str(tmp_path / "cached"), precompute_ref=True, max_steps=4, **common))
    assert cached.steps == 4
    live_rows = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    cached_rows = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    live_losses = [r["loss"] for r in live_rows if "loss" in r][:1]
    cached_losses = [r["loss"] for r in cached_rows if "loss" in r][:1]
    assert cached_losses == pytest.approx(live_losses, abs=1e-5)


@pytest.mark.parametrize("flags, why", [
    (["--ld-alpha", "0.5"], "--ld-alpha (LD-DPO) splits each pair's log-probs at the shorter completion's length"),
    (["--use-weighting"], "--use-weighting (WPO) weights each pair record by its two completions"),
])
@pytest.mark.parametrize("where", ["--data", "--eval-data"])
def test_pair_only_options_on_a_group_file_are_one_error_line(tiny_model_dir, tmp_path, capsys, flags, why, where):
    """``--ld-alpha`` / ``--use-weighting`` with a groups file (as training or held-out data): one
    ``preftune: error:`` line naming the option, why it needs pairs, and the file, once the data is read;
    exit 1 (bad data for the options)."""
    from preftune.cli.main import main

    groups = write_jsonl(tmp_path / "groups.jsonl", ranked_rule_groups(8, seed=1))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": g["prompt"], "chosen": g["responses"][0],
                                                    "rejected": g["responses"][1]} for g in ranked_rule_groups(8, seed=3)])
    data, eval_data = (groups, pairs) if where == "--data" else (pairs, groups)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(eval_data),
            "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--no-progress", *flags]
    code = main([*args, "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1  # the data and the option together: a data error
    assert lines[-1] == (f"preftune: error: {why}; {groups} holds 8 response groups (k responses to one prompt), "
                         "which have no such pair: drop the option, or train on pair records")
    assert not any("Traceback" in line for line in lines)


def _rank_objective(loss, examples, ids, values, ref, **options):
    """compute_objective on the groups ``ids`` of ``examples``: (G, K) log-probs ``values`` / ``ref`` rows."""
    k = max(len(examples[i].scores) for i in ids)
    scores = torch.zeros(len(ids), k)
    mask = torch.zeros(len(ids), k, dtype=torch.bool)
    for row, i in enumerate(ids):
        scores[row, :len(examples[i].scores)] = torch.tensor(examples[i].scores)
        mask[row, :len(examples[i].scores)] = True
    policy_gk, ref_gk = values[ids, :k] * mask, ref[ids, :k] * mask
    policy = LogpOutput(logps=policy_gk.t().reshape(-1), counts=mask.t().reshape(-1).long() * 3,
                        token_logps=torch.zeros(0))
    return compute_objective(loss, policy, len(ids), ref_logps=ref_gk.t().reshape(-1), beta=0.1, scores=scores,
                             completion_mask=mask, **options)[0]


@pytest.mark.parametrize("loss, group_pairs", [("dpo", "all"), ("dpo", "best-vs-worst"), ("ipo", "all"),
                                               ("plackett_luce", "all"), ("lipo_lambda", "all")])
def test_rank_weights_make_the_ddp_average_the_global_batch_loss(loss, group_pairs):
    """Two ranks of two groups each, the groups holding 6, 1, 2 and 0 ordered pairs (k = 4, k = 2, a tie in a
    k = 3 group, an all-tied pair): the ranks' losses weighted by :func:`rank_weight` and averaged as DDP
    averages gradients equal the loss of the whole global batch in one process (the mean over its ordered
    pairs for a pair loss, over its groups for a listwise one); weighting by group counts would not."""
    from preftune.training.step import loss_terms, rank_weight

    examples = [TokenizedExample(index=0, prompt_ids=[1], completions=[[2]] * 4, scores=[3.0, 1.0, 2.0, 0.0]),
                TokenizedExample(index=1, prompt_ids=[1], completions=[[2]] * 2, scores=[1.0, 0.0]),
                TokenizedExample(index=2, prompt_ids=[1], completions=[[2]] * 3, scores=[1.0, 1.0, 0.0]),
                TokenizedExample(index=3, prompt_ids=[1], completions=[[2]] * 2, scores=[2.0, 2.0])]
    if loss == "plackett_luce" or loss == "lipo_lambda":
        examples[3].scores = [2.0, 1.0]  # a listwise loss takes every group
    cfg = TrainConfig(model="tiny", data="groups.jsonl", loss=loss, group_pairs=group_pairs)
    gen = torch.Generator().manual_seed(0)
    values, ref = -torch.rand(4, 4, generator=gen) * 10, -torch.rand(4, 4, generator=gen) * 10
    everything = _rank_objective(loss, examples, [0, 1, 2, 3], values, ref, group_pairs=group_pairs)
    ranks = [[0, 1], [2, 3]]
    weights = [rank_weight(cfg, examples, ids, [0, 1, 2, 3], 2) for ids in ranks]
    averaged = sum(w * _rank_objective(loss, examples, ids, values, ref, group_pairs=group_pairs)
                   for w, ids in zip(weights, ranks)) / 2
    assert float(averaged) == pytest.approx(float(everything), abs=1e-6)
    terms = [loss_terms(cfg, example) for example in examples]
    if loss in ("dpo", "ipo") and group_pairs == "all":
        assert terms == [6, 1, 2, 0] and weights == [pytest.approx(2 * 7 / 9), pytest.approx(2 * 2 / 9)]
        by_groups = sum(_rank_objective(loss, examples, ids, values, ref) for ids in ranks) / 2
        assert float(by_groups) != pytest.approx(float(everything), abs=1e-3)
    if loss in ("plackett_luce", "lipo_lambda"):
        assert terms == [1, 1, 1, 1] and weights == [1.0, 1.0]


def test_rank_weight_of_pairs_is_the_share_of_examples():
    from preftune.training.step import rank_weight

    cfg = TrainConfig(model="tiny", data="pairs.jsonl", loss="dpo")
    pairs = [TokenizedExample(index=i, prompt_ids=[1], completions=[[2], [3]]) for i in range(5)]
    assert rank_weight(cfg, pairs, [0, 1, 2], list(range(5)), 2) == pytest.approx(3 * 2 / 5)
    assert rank_weight(cfg, pairs, list(range(5)), list(range(5)), 1) == 1.0
