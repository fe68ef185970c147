"""Reward models (``--loss reward``): the loss by hand and against TRL's RewardTrainer, the reward read
on the training data path (padded = packed = transformers' own classifier), a tiny reward model that
learns the hidden rule and then judges, and the errors around it."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import rule_pairs, write_jsonl

from preftune.cli.main import main as cli_main
from preftune.config.train_config import TrainConfig
from preftune.data.collate import collate_packed, collate_padded
from preftune.data.errors import DataError
from preftune.data.formats import to_example
from preftune.methods.losses.reward import reward_loss
from preftune.methods.objective import compute_objective
from preftune.methods.table import parse
from preftune.model.loading import is_reward_model_folder, load_model, reward_model_from_causal_lm
from preftune.model.logprobs import LogpOutput, batch_logps, is_reward_model

RC = torch.tensor([1.0, 0.0, -0.3])
RR = torch.tensor([0.0, 0.5, -1.2])
MARGINS = torch.tensor([0.5, 0.0, 0.2])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_reward_loss_by_hand():
    # -log sigmoid(d) = softplus(-d); d = rc - rr - m
    losses, chosen, rejected = reward_loss(RC, RR)
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(0.5), softplus(-0.9)], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.313262, 0.974077, 0.341154], abs=1e-6)
    assert chosen.tolist() == RC.tolist() and not chosen.requires_grad
    with_margin, _, _ = reward_loss(RC, RR, MARGINS)
    assert with_margin.tolist() == pytest.approx([0.474077, 0.974077, 0.403186], abs=1e-6)
    centred, _, _ = reward_loss(RC, RR, MARGINS, center_rewards_coefficient=0.1)
    # + 0.1 * (rc + rr)^2 = 0.1, 0.025, 0.225
    assert centred.tolist() == pytest.approx([0.574077, 0.999077, 0.628186], abs=1e-6)
    with pytest.raises(ValueError, match="1-D tensors of one shape"):
        reward_loss(RC, RR, MARGINS[:2])


def _trl_reward_loss(margin: bool, coef: float | None) -> float:
    from trl import RewardTrainer

    logits = torch.cat([RC, RR])[:, None]  # (2B, 1): chosen rows first, as TRL's collator stacks them
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=coef),
                           accelerator=accelerator, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "attention_mask": torch.ones(6, 3)}
    if margin:
        inputs["margin"] = MARGINS
    return float(RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs))


@pytest.mark.parametrize("margin, coef", [(False, None), (True, None), (True, 0.01), (False, 0.3)])
def test_reward_objective_matches_trl(margin, coef):
    policy = LogpOutput(torch.zeros(6), torch.ones(6, dtype=torch.long), torch.zeros(0), rewards=torch.cat([RC, RR]))
    options = {} if coef is None else {"center_rewards_coefficient": coef}
    loss, metrics = compute_objective("reward", policy, 3, margins=MARGINS if margin else None, **options)
    assert float(loss) == pytest.approx(_trl_reward_loss(margin, coef), rel=1e-6)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(2 / 3)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((RC - RR).mean()))
    assert "logps/chosen" not in metrics and "nll" not in metrics


# ----------------------------------------------------------------------------- the reward on the data path


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), head="reward").eval()
    with torch.no_grad():  # a head with weight in every direction, so every hidden unit counts
        model.score.weight.normal_(0, 1.0)
    return model


def _examples(tokenizer, n: int):
    from preftune.data.tokenize import tokenize_example

    rows = rule_pairs(n, seed=5)
    return [tokenize_example(tokenizer, to_example(row, None, "pair"), i) for i, row in enumerate(rows)]


def test_reward_model_from_a_causal_lm_keeps_the_body(tiny_model_dir, tiny_reward_model):
    causal = load_model(str(tiny_model_dir))
    assert is_reward_model(tiny_reward_model) and not is_reward_model(causal)
    assert tiny_reward_model.config.num_labels == 1
    ids = torch.tensor([[1, 7, 9, 30, 2]])
    with torch.no_grad():
        expected = causal.model(input_ids=ids).last_hidden_state
        got = tiny_reward_model.model(input_ids=ids).last_hidden_state
    assert torch.equal(expected, got)
    assert reward_model_from_causal_lm(causal).score.weight.shape == (1, causal.config.hidden_size)


def test_rewards_padded_packed_and_transformers_agree(tiny_tokenizer, tiny_reward_model):
    """The head reads each sequence's last token: padded rows, packed rows (several sequences per row,
    each attending to its own prompt and completion) and transformers' own classifier forward on the
    unpadded sequence give the same reward (fp32, 1e-5)."""
    examples = _examples(tiny_tokenizer, 6)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded = batch_logps(tiny_reward_model, collate_padded(examples, pad_id=pad)).rewards
        packed = batch_logps(tiny_reward_model, collate_packed(examples, pad_id=pad, pack_tokens=4096)).rewards
        own = []
        for k in range(2):  # s = k * G + g: chosen first, then rejected
            for ex in examples:
                ids = torch.tensor([ex.prompt_ids + ex.completions[k]])
                own.append(float(tiny_reward_model(input_ids=ids).logits[0, 0]))
    assert padded.shape == (12,)
    assert packed.tolist() == pytest.approx(padded.tolist(), abs=1e-5)
    assert padded.tolist() == pytest.approx(own, abs=1e-5)
    assert float(padded.std()) > 0.01  # the rewards differ: the comparison is not between constants


def test_margin_field_is_read_and_checked(tiny_tokenizer):
    from preftune.data.tokenize import tokenize_example

    row = rule_pairs(1, seed=0)[0]
    with_margin = tokenize_example(tiny_tokenizer, to_example({**row, "margin": 2}, None, "pair"), 0)
    without = tokenize_example(tiny_tokenizer, to_example(row, None, "pair"), 1)
    assert with_margin.margin == 2.0 and without.margin is None
    assert collate_padded([with_margin, without], pad_id=0).margins.tolist() == [2.0, 0.0]
    assert collate_padded([without], pad_id=0).margins is None
    with pytest.raises(DataError, match="'margin' must be a finite number"):
        to_example({**row, "margin": "high"}, None, "pair")


def test_reward_is_not_combined_with_other_methods():
    with pytest.raises(ValueError, match="cannot be combined"):
        parse("reward,sft")
    assert parse("reward").model_head == "reward" and parse("dpo").model_head == "lm"
    with pytest.raises(ValueError, match="center-rewards-coefficient applies to --loss reward"):
        TrainConfig(model="m", data="d", output_dir="o", loss="dpo", center_rewards_coefficient=0.1).validate()


# ----------------------------------------------------------------------------- learns, evaluates, judges


@pytest.fixture(scope="module")
def trained_reward_model(tiny_model_dir, tmp_path_factory):
    """``preftune train --loss reward`` on 256 rule pairs (32 steps of 8)."""
    folder = tmp_path_factory.mktemp("reward")
    train_file = write_jsonl(folder / "train.jsonl", rule_pairs(256, seed=1))
    eval_file = write_jsonl(folder / "eval.jsonl", rule_pairs(64, seed=2))
    out = folder / "rm"
    code = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(train_file), "--eval-data",
                     str(eval_file), "--loss", "reward", "--learning-rate", "1e-3", "--batch-size", "8",
                     "--epochs", "1", "--center-rewards-coefficient", "0.01", "--output-dir", str(out),
                     "--no-progress", "--logging-steps", "8"])
    assert code == 0
    return {"model": out, "eval": eval_file}


def test_tiny_reward_model_learns_the_rule(trained_reward_model):
    out = trained_reward_model["model"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 32
    assert summary["reference"] == "none"
    assert 0.2 <= summary["eval_before"]["rewards/accuracies"] <= 0.8  # a random head: near chance
    assert summary["eval_after"]["rewards/accuracies"] >= 0.9
    assert is_reward_model_folder(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert "rewards/accuracies" in train_rows[-1]


def test_eval_reports_the_reward_models_pair_accuracy(trained_reward_model, capsys):
    from preftune import evaluate  # preftune.evaluate: evaluate_model of an EvalConfig of these keywords

    result = evaluate(trained_reward_model["model"], trained_reward_model["eval"])
    pref = result["preference"]
    assert result["kind"] == "reward" and pref["pairs"] == 64
    assert pref["accuracy"] >= 0.9
    assert pref["accuracy_low"] < pref["accuracy"] <= pref["accuracy_high"]
    assert pref["reward_margin"] > 0
    # the same numbers as the training loop's final held-out evaluation
    summary = json.loads((trained_reward_model["model"] / "summary.json").read_text())
    assert pref["accuracy"] == pytest.approx(summary["eval_after"]["rewards/accuracies"], abs=1e-6)
    assert cli_main(["eval", "--model", str(trained_reward_model["model"]), "--data",
                     str(trained_reward_model["eval"])]) == 0
    assert "pair accuracy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is a reward model"):
        evaluate(trained_reward_model["model"], trained_reward_model["eval"],
                       ref_model=trained_reward_model["model"])


def test_trained_reward_model_works_as_a_judge(trained_reward_model):
    from preftune.evaluation.judges.registry import make_judge
    from preftune.evaluation.judges.reward_model import RewardModelJudge

    judge = make_judge(f"reward-model:{trained_reward_model['model']}")
    assert isinstance(judge, RewardModelJudge)
    pairs = rule_pairs(40, seed=9)
    examples = [to_example(row, None, "pair") for row in pairs]
    result = judge.compare([e.prompt for e in examples], [e.chosen for e in examples],
                           [e.rejected for e in examples])
    assert result.win_rate().rate >= 0.9  # the rule-following reply wins under the learned reward
    # one-at-a-time and batched scores agree (padding never reaches the head)
    prompts, responses = [e.prompt for e in examples[:5]], [e.chosen for e in examples[:5]]
    single = RewardModelJudge(str(trained_reward_model["model"]), batch_size=1).score(prompts, responses)
    assert judge.score(prompts, responses) == pytest.approx(single, abs=1e-5)


def test_reward_judge_scores_mixed_lengths_in_the_responses_order(trained_reward_model):
    """Batches are formed longest first; each score lands at its response's position (equal to scoring
    it alone), so a long response beside short ones gets its own score, not a neighbour's."""
    from preftune.evaluation.judges.reward_model import RewardModelJudge

    path = str(trained_reward_model["model"])
    examples = [to_example(row, None, "pair") for row in rule_pairs(7, seed=11)]
    prompts = [e.prompt for e in examples]
    responses = [" ".join([e.chosen] * (1 + i % 3)) for i, e in enumerate(examples)]  # 1x, 2x, 3x long
    batched = RewardModelJudge(path, batch_size=3).score(prompts, responses)
    single = [RewardModelJudge(path, batch_size=1).score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(x, 4) for x in batched)) > 3  # really different scores, so a mix-up would show


def test_base_cache_keeps_the_reward_models_scores_of_the_base(trained_reward_model, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """With a reward-model judge the base's judge scores are cached beside its samples: the second
    evaluation scores only the model's samples, and every number equals the uncached evaluation."""
    import preftune.evaluation.judges.reward_model as judges
    from preftune import evaluate  # preftune.evaluate: evaluate_model of an EvalConfig of these keywords

    data = write_jsonl(tmp_path / "held_out.jsonl", rule_pairs(12, seed=5))
    opts = dict(ref_model=tiny_model_dir, generate=6, judge=f"reward-model:{trained_reward_model['model']}",
                max_new_tokens=6, max_length=64, max_prompt_length=32)
    cache = tmp_path / "base_cache.json"
    plain = evaluate(tiny_model_dir, data, **opts)
    first = evaluate(tiny_model_dir, data, base_cache=cache, **opts)
    assert first.pop("base_cache")["stored"] == ["held-out pair log-probs", "samples", "judge scores"]
    assert first == plain
    assert plain["generation"]["win_rate"]["ties"] == 6  # the base against itself: equal samples, equal scores

    scored = []
    original = judges.RewardModelJudge.score
    monkeypatch.setattr(judges.RewardModelJudge, "score",
                        lambda self, p, r: scored.append(len(r)) or original(self, p, r))
    second = evaluate(tiny_model_dir, data, base_cache=cache, **opts)
    assert second.pop("base_cache")["reused"] == ["held-out pair log-probs", "samples", "judge scores"]
    # the model is the base: its six samples are the base's word for word, each takes the base's cached score
    # (a tie), so nothing is scored at all
    assert second == plain and scored == []
    # another judge (other weights) is another key: its scores of the base are computed, not reused
    other = tmp_path / "other-rm"
    model = load_model(str(trained_reward_model["model"]), head="reward")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "score" in n).mul_(-1.0)
    model.save_pretrained(other)
    load_tokenizer_and_save(trained_reward_model["model"], other)
    flipped = evaluate(tiny_model_dir, data, base_cache=cache, **{**opts, "judge": f"reward-model:{other}"})
    assert "judge scores" in flipped["base_cache"]["stored"]
    assert flipped["generation"]["score_base"] == pytest.approx(-plain["generation"]["score_base"], abs=1e-4)


def load_tokenizer_and_save(source, target):
    from preftune.model.loading import load_tokenizer

    load_tokenizer(str(source)).save_pretrained(target)


def test_a_causal_lm_is_not_a_judge(tiny_model_dir):
    from preftune.evaluation.judges.registry import make_judge

    with pytest.raises(ValueError, match="not a reward model folder"):
        make_judge(f"reward-model:{tiny_model_dir}")
