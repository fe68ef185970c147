"""evaluate_model on a tiny Llama: hand-computed metrics, KL to the base, win rates, the eval CLI and its
EvalConfig (flags, ranges, YAML, the Python API's checks)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import BAD, GOOD, TOPICS, write_jsonl
from conftest import RULE_JUDGE_SOURCE as JUDGE_SOURCE
from transformers import AutoModelForCausalLM

from preftune.cli.eval import register
from preftune.config.eval_config import EvalConfig
from preftune.config.train_config import TrainConfig
from preftune.data import load_dataset
from preftune.evaluation.evaluate import RAW_PREFERENCE, evaluate_model
from preftune.evaluation.judges.base import CompareResult, Judge
from preftune.evaluation.prompts import read_prompts
from preftune.evaluation.report_table import format_table, to_json
from preftune.evaluation.sampling import estimate_kl
from preftune.model.loading import load_tokenizer
from preftune.training.loop import train

LENGTHS = dict(max_length=64, max_prompt_length=32)


def run_eval(model, data, judge=None, **options) -> dict:
    """:func:`evaluate_model` of an EvalConfig of these options; ``judge`` a spec or a Judge object."""
    if judge is not None and not isinstance(judge, str):
        return evaluate_model(EvalConfig.from_options({"model": model, "data": data, **options}, "test"), judge=judge)
    return evaluate_model(EvalConfig.from_options({"model": model, "data": data, "judge": judge, **options}, "test"))


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Generation is thousands of tiny matmuls: one thread is much faster on a busy 2-core machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, rule_data, tmp_path_factory):
    """The tiny model after 16 DPO steps on the rule task (lr 3e-3): clearly moved away from the base."""
    out = tmp_path_factory.mktemp("eval-trained")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(model=str(tiny_model_dir), data=str(rule_data["train"]), output_dir=str(out), loss="dpo",
                          beta=0.1, learning_rate=3e-3, batch_size=8, max_steps=16, warmup_ratio=0.0,
                          lr_scheduler="constant", seed=0, progress=False, logging_steps=8, **LENGTHS))
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("judges") / "rule_judge.py"
    path.write_text(JUDGE_SOURCE + "\n\ndef constant(prompt, response):\n    return 1.0\n"
                    "\n\ndef length(prompt, response):\n    return len(response)\n")
    return path


def summed_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum_t log p(x_t | x_<t) over the completion tokens, from one plain unpadded forward."""
    ids = prompt_ids + completion_ids
    with torch.no_grad():
        logps = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V)
    return sum(logps[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


def hand_metrics(model_dir, ref_dir, data, n: int, beta: float) -> dict:
    """Per-pair sums by hand, then, with r = beta * (logp_model - logp_ref):
    accuracy = mean[r_chosen > r_rejected], margin = mean[r_chosen - r_rejected],
    DPO loss = mean[-log sigmoid(r_chosen - r_rejected)], NLL = -sum logp(chosen) / chosen tokens."""
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = load_dataset(data, tokenizer, "pair", limit=n, **LENGTHS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    pc, pr, rc, rr = [], [], [], []
    for ex in examples:
        chosen, rejected = ex.completions
        pc.append(summed_logps(model, ex.prompt_ids, chosen))
        pr.append(summed_logps(model, ex.prompt_ids, rejected))
        rc.append(summed_logps(ref, ex.prompt_ids, chosen))
        rr.append(summed_logps(ref, ex.prompt_ids, rejected))
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr))
    margin = beta * (pc - rc) - beta * (pr - rr)
    tokens = sum(len(ex.completions[0]) for ex in examples)
    return {"pairs": len(examples), "accuracy": (margin > 0).double().mean().item(),
            "reward_margin": margin.mean().item(), "dpo_loss": (-F.logsigmoid(margin)).mean().item(),
            "reward_chosen": (beta * (pc - rc)).mean().item(), "reward_rejected": (beta * (pr - rr)).mean().item(),
            "logps_chosen": pc.mean().item(), "logps_rejected": pr.mean().item(),
            "raw_accuracy": (pc > pr).double().mean().item(), "chosen_change": (pc - rc).mean().item(),
            "tau": torch.sign(margin)[margin != 0].mean().item(),
            "nll_model": -pc.sum().item() / tokens, "nll_base": -rc.sum().item() / tokens, "tokens": tokens}


def test_metrics_match_a_hand_computation(trained_dir, tiny_model_dir, rule_data):
    expected = hand_metrics(trained_dir, tiny_model_dir, rule_data["eval"], n=24, beta=0.1)
    result = run_eval(trained_dir, rule_data["eval"], ref_model=tiny_model_dir, beta=0.1, max_examples=24,
                            batch_size=8, **LENGTHS)
    pref, nll = result["preference"], result["nll"]
    assert pref["pairs"] == expected["pairs"] == 24
    assert expected["reward_margin"] != 0 and expected["dpo_loss"] != pytest.approx(math.log(2))  # moved
    for key in ("accuracy", "reward_margin", "dpo_loss", "reward_chosen", "reward_rejected", "logps_chosen",
                "logps_rejected"):
        assert pref[key] == pytest.approx(expected[key], abs=1e-5), key
    assert nll["tokens"] == expected["tokens"]
    assert nll["model"] == pytest.approx(expected["nll_model"], abs=1e-5)
    assert nll["base"] == pytest.approx(expected["nll_base"], abs=1e-5)
    assert nll["difference"] == pytest.approx(expected["nll_model"] - expected["nll_base"], abs=1e-5)
    assert nll["difference"] < 0  # DPO on the rule raised the chosen log-probs here
    assert result["reference"] == str(tiny_model_dir) and result["generation"] is None
    # ranking view of the pairs: the ranking accuracy is the preference accuracy, tau-b per pair is +-1
    assert pref["ordered_pairs"] == 24 and pref["groups"] is None  # the accuracy: a float32 mean, the ranking: exact
    assert pref["ranking_accuracy"] == pytest.approx(pref["accuracy"], abs=1e-6) == expected["accuracy"]
    assert pref["kendall_tau"] == pytest.approx(expected["tau"], abs=1e-9)
    assert pref["chosen_logp_change"] == pytest.approx(expected["chosen_change"], abs=1e-4)
    table = format_table(result)
    assert f"logp chosen change vs base  {pref['chosen_logp_change']:+.3f}" in table
    assert "ranking accuracy" in table and f"{pref['kendall_tau']:+.4f}" in table

    raw = run_eval(trained_dir, rule_data["eval"], max_examples=24, **LENGTHS)  # no reference model
    assert raw["reference"] == RAW_PREFERENCE
    assert raw["preference"]["accuracy"] == pytest.approx(expected["raw_accuracy"], abs=1e-9)
    assert "raw log-prob" in raw["preference"]["accuracy_definition"]
    assert raw["preference"]["dpo_loss"] is None and raw["nll"]["base"] is None
    assert raw["preference"]["ranking_accuracy"] == pytest.approx(raw["preference"]["accuracy"], abs=1e-6)
    assert raw["preference"]["chosen_logp_change"] is None and "logp chosen change" not in format_table(raw)
    assert "raw log-prob preference" in format_table(raw)


def rule_groups(n: int, seed: int) -> list[dict]:
    """The rule task as response groups of 2 to 4 responses scored by minus their rule-breaking words (0-2),
    so some groups hold tied responses."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        responses, scores = [], []
        for _ in range(rng.randint(2, 4)):
            words = [rng.choice(GOOD) for _ in range(rng.randint(2, 4))]
            bad = rng.randint(0, 2)
            for i in rng.sample(range(len(words)), bad):
                words[i] = rng.choice(BAD)
            responses.append(f" The {topic} is {' '.join(words)}.")
            scores.append(-bad)
        rows.append({"prompt": f"\n\nHuman: Tell me about the {topic}.\n\nAssistant:", "responses": responses,
                     "scores": scores})
    return rows


def hand_group_metrics(model_dir, ref_dir, data, beta: float) -> dict:
    """Each response summed by hand (one plain forward), then with r = beta * (logp_model - logp_ref), pair by
    pair over every group's ordered pairs (scores differ): accuracy, DPO loss; Kendall's tau-b of each group
    from its concordant / discordant / tied pair counts, averaged; the best response's log-prob change and NLL."""
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = load_dataset(data, tokenizer, "group", **LENGTHS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    agree, losses, taus, changes, nll, tokens = [], [], [], [], 0.0, 0
    for ex in examples:
        lp = [summed_logps(model, ex.prompt_ids, c) for c in ex.completions]
        lr = [summed_logps(ref, ex.prompt_ids, c) for c in ex.completions]
        r = [beta * (a - b) for a, b in zip(lp, lr)]
        y = ex.scores
        concordant = discordant = tied_y = tied_r = 0
        for i, j in itertools.combinations(range(len(y)), 2):
            tied_y += y[i] == y[j]
            tied_r += r[i] == r[j]
            if y[i] != y[j]:
                better, worse = (i, j) if y[i] > y[j] else (j, i)
                agree.append(r[better] > r[worse])
                losses.append(-F.logsigmoid(torch.tensor(r[better] - r[worse], dtype=torch.float64)).item())
                if r[i] != r[j]:
                    concordant += (y[i] > y[j]) == (r[i] > r[j])
                    discordant += (y[i] > y[j]) != (r[i] > r[j])
        n0 = len(y) * (len(y) - 1) // 2
        if (n0 - tied_y) * (n0 - tied_r) > 0:
            taus.append((concordant - discordant) / math.sqrt((n0 - tied_y) * (n0 - tied_r)))
        top = [k for k in range(len(y)) if y[k] == max(y)]
        changes.append(sum(lp[k] - lr[k] for k in top) / len(top))
        nll -= lp[top[0]]
        tokens += len(ex.completions[top[0]])
    return {"groups": len(examples), "pairs": len(agree), "accuracy": sum(agree) / len(agree),
            "dpo_loss": sum(losses) / len(losses), "tau": sum(taus) / len(taus), "tau_groups": len(taus),
            "chosen_change": sum(changes) / len(changes), "nll": nll / tokens, "tokens": tokens}


def test_group_file_metrics_match_a_hand_computation(trained_dir, tiny_model_dir, tmp_path):
    """``preftune eval --data groups.jsonl``: each group one forward through the training path (packed and
    padded give the same), the metrics over the groups' ordered pairs, Kendall's tau-b per group and the best
    response's log-prob change, all as computed response by response by hand; the base's group log-probs are
    kept in the base cache and give the same result read back."""
    data = write_jsonl(tmp_path / "groups.jsonl", rule_groups(12, seed=5))
    expected = hand_group_metrics(trained_dir, tiny_model_dir, data, beta=0.1)
    assert expected["pairs"] < sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rule_groups(12, 5))
    result = run_eval(trained_dir, data, ref_model=tiny_model_dir, beta=0.1, batch_size=5, **LENGTHS)
    pref, nll = result["preference"], result["nll"]
    assert (pref["groups"], pref["pairs"], pref["ordered_pairs"]) == (12, expected["pairs"], expected["pairs"])
    assert pref["ranking_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert pref["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert pref["dpo_loss"] == pytest.approx(expected["dpo_loss"], abs=1e-5)
    assert pref["tau_groups"] == expected["tau_groups"]
    assert pref["kendall_tau"] == pytest.approx(expected["tau"], abs=1e-6) and pref["kendall_tau"] > 0
    assert pref["chosen_logp_change"] == pytest.approx(expected["chosen_change"], abs=1e-4)
    assert nll["tokens"] == expected["tokens"] and nll["model"] == pytest.approx(expected["nll"], abs=1e-5)
    assert nll["data"] == f"best responses of {data}"
    table = format_table(result)
    assert f"held-out groups             12, {expected['pairs']} ordered pairs" in table
    assert f"Kendall tau-b               {pref['kendall_tau']:+.4f}" in table
    assert f"logp chosen change vs base  {pref['chosen_logp_change']:+.3f}" in table

    padded = run_eval(trained_dir, data, ref_model=tiny_model_dir, beta=0.1, batch_size=5, packing=False, **LENGTHS)
    for key in ("accuracy", "dpo_loss", "kendall_tau", "chosen_logp_change", "logps_chosen"):
        assert padded["preference"][key] == pytest.approx(pref[key], abs=1e-5), key

    cache = tmp_path / "base_cache.json"
    first = run_eval(trained_dir, data, ref_model=tiny_model_dir, beta=0.1, batch_size=5, base_cache=cache, **LENGTHS)
    assert first.pop("base_cache")["stored"] == ["held-out group log-probs"]  # the NLL read from them
    again = run_eval(trained_dir, data, ref_model=tiny_model_dir, beta=0.1, batch_size=5, base_cache=cache, **LENGTHS)
    assert again.pop("base_cache")["reused"] == ["held-out group log-probs"]
    assert first == again == result

    raw = run_eval(trained_dir, data, beta=0.1, **LENGTHS)["preference"]  # no base: beta * log p ranks
    assert raw["chosen_logp_change"] is None and raw["dpo_loss"] is None
    assert "logp(better)" in raw["accuracy_definition"]
    assert raw["ranking_accuracy"] == pytest.approx(raw["accuracy"], abs=1e-6)


def test_a_file_mixing_pairs_and_groups_reads_as_groups(tiny_model_dir, rule_data, tmp_path, capsys):
    """Pair rows beside group rows are groups of two scored 1 and 0 (as training reads such a file);
    ``preftune eval --json`` prints the same result."""
    rows = [json.loads(line) for line in rule_data["eval"].read_text().splitlines()[:3]] + rule_groups(2, seed=6)
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = run_eval(tiny_model_dir, data, ref_model=tiny_model_dir, **LENGTHS)
    pref = result["preference"]
    group_pairs = sum(a != b for r in rows[3:] for a, b in itertools.combinations(r["scores"], 2))
    assert pref["groups"] == 5 and pref["pairs"] == pref["ordered_pairs"] == 3 + group_pairs
    assert pref["chosen_logp_change"] == 0.0 and pref["dpo_loss"] == pytest.approx(math.log(2))
    args = parser().parse_args(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--data",
                                str(data), "--max-length", "64", "--max-prompt-length", "32", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["preference"] == json.loads(to_json(result))["preference"]


def test_kl_is_zero_against_itself_and_positive_after_training(trained_dir, tiny_model_dir, rule_data):
    common = dict(generate=8, max_new_tokens=8, max_examples=4, **LENGTHS)
    same = run_eval(tiny_model_dir, rule_data["eval"], ref_model=tiny_model_dir, **common)["generation"]
    assert abs(same["kl"]) < 1e-6 and same["kl_stderr"] < 1e-6
    assert all(s["model"] == s["base"] for s in same["samples"])  # same weights, same seed

    moved = run_eval(trained_dir, rule_data["eval"], ref_model=tiny_model_dir, kl_samples=16,
                           **common)["generation"]
    assert moved["kl_samples"] == 128
    assert moved["kl"] > 2 * moved["kl_stderr"] > 0, (moved["kl"], moved["kl_stderr"])

    # With temperature 1 and one sample per prompt the judged samples are reused for the KL:
    # the same estimate as generate.estimate_kl with the same seed.
    reused = run_eval(trained_dir, rule_data["eval"], ref_model=tiny_model_dir, **common)["generation"]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(trained_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = read_prompts(rule_data["eval"], limit=8)
    mean, stderr = estimate_kl(model, base, tokenizer, prompts, n_samples=1, max_new_tokens=8, seed=0)
    assert reused["kl"] == pytest.approx(mean, abs=1e-5) and reused["kl_stderr"] == pytest.approx(stderr, abs=1e-5)


class FixedJudge(Judge):
    """Returns preset outcomes (and problem counts) and records what it was asked."""

    spec = "fixed"

    def __init__(self, result: CompareResult):
        self.result, self.calls = result, []

    def compare(self, prompts, responses_a, responses_b):
        self.calls.append((list(prompts), list(responses_a), list(responses_b)))
        return self.result


def test_win_rate_and_interval_from_a_judge_with_known_outcomes(tiny_model_dir, rule_data, judge_file):
    """Outcomes 1,1,1,0,0.5,0.5: rate = (3 + 2 * 0.5) / 6 = 2/3. Wilson, z^2 = 3.8415, n = 6:
    centre = (2/3 + z^2/12) / (1 + z^2/6) = 0.98679 / 1.64025 = 0.6016,
    half = z / (1 + z^2/6) * sqrt((2/9)/6 + z^2/144) = 1.19492 * 0.25242 = 0.3016, so [0.3000, 0.9032]."""
    judge = FixedJudge(CompareResult([1.0, 1.0, 1.0, 0.0, 0.5, 0.5], ties=2, inconsistent=1, unparseable=1))
    result = run_eval(tiny_model_dir, rule_data["eval"], ref_model=tiny_model_dir, generate=6, judge=judge,
                            max_new_tokens=4, max_examples=2, **LENGTHS)
    gen = result["generation"]
    wr = gen["win_rate"]
    assert wr["rate"] == pytest.approx(2 / 3)
    assert (wr["low"], wr["high"]) == pytest.approx((0.3000, 0.9032), abs=1e-4)
    assert (wr["n"], wr["wins"], wr["losses"], wr["ties"]) == (6, 3, 1, 2)
    assert (wr["inconsistent"], wr["unparseable"], wr["errors"]) == (1, 1, 0)
    prompts, a, b = judge.calls[0]
    assert a == [s["model"] for s in gen["samples"]] and b == [s["base"] for s in gen["samples"]]  # model is "a"
    assert prompts == read_prompts(rule_data["eval"], limit=6)
    table = format_table(result)
    assert "0.667 [0.300, 0.903]" in table and "inconsistent 1, unparseable 1" in table
    assert json.loads(to_json(result))["generation"]["win_rate"]["wins"] == 3

    # A scoring judge from a spec string that scores everything alike: every item ties.
    tied = run_eval(tiny_model_dir, rule_data["eval"], ref_model=tiny_model_dir, generate=4,
                          judge=f"python:{judge_file}:constant", max_new_tokens=4, max_examples=2, **LENGTHS)
    wr = tied["generation"]["win_rate"]
    assert (wr["rate"], wr["ties"], wr["wins"]) == (0.5, 4, 0)
    assert tied["generation"]["score_model"] == tied["generation"]["score_base"] == 1.0


def test_base_cache_gives_the_uncached_results_and_computes_the_base_once(trained_dir, tiny_model_dir, rule_data,
                                                                         judge_file, tmp_path, monkeypatch):
    """A sweep's variants share the base's held-out log-probs, NLL and samples through ``base_cache``:
    results equal the uncached ones exactly; the second model runs no base forward for the pairs or
    the NLL and draws no base samples; a changed seed or base is a new key, not a stale value."""
    import preftune.evaluation.evaluate as ev

    opts = dict(ref_model=tiny_model_dir, generate=8, judge=f"python:{judge_file}:rule_score", max_new_tokens=8,
                max_examples=16, **LENGTHS)
    cache = tmp_path / "base_cache.json"
    plain = {name: run_eval(path, rule_data["eval"], **opts)
             for name, path in (("trained", trained_dir), ("base", tiny_model_dir))}
    first = run_eval(trained_dir, rule_data["eval"], base_cache=cache, **opts)
    assert first.pop("base_cache") == {"path": str(cache), "reused": [],
                                       "stored": ["held-out pair log-probs", "samples"]}
    assert first == plain["trained"]
    # a moved model, really judged (its 8-sample KL estimate may fall either side of 0; it is not 0)
    assert first["preference"]["accuracy"] != 0.5 and first["generation"]["kl"] != 0

    calls = {"pair_logps": 0, "total_nll": 0, "sample": 0}

    def counting(name):
        original = getattr(ev, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(ev, name, counting(name))
    # the base's prompt states (its keys and values after each prompt, for the KL) are kept beside the cache
    (kept,) = (tmp_path / "base_cache-prompt-states").glob("prompt-states-base-*.safetensors")
    import preftune.evaluation.prompt_states as ps

    computed = []
    compute = ps.PromptStates.compute
    monkeypatch.setattr(ps.PromptStates, "compute", classmethod(
        lambda cls, *args: computed.append(args[1]) or compute(*args)))
    second = run_eval(tiny_model_dir, rule_data["eval"], base_cache=cache, **opts)
    assert second.pop("base_cache")["reused"] == ["held-out pair log-probs", "samples"]
    assert second == plain["base"]
    assert calls == {"pair_logps": 1, "total_nll": 0, "sample": 0}  # the model's own forwards only (the NLL is
    # read from the preference pass's chosen log-probs)
    assert computed == []  # the base's prompt states were read back from the file

    reseeded = run_eval(trained_dir, rule_data["eval"], base_cache=cache, **{**opts, "seed": 1})
    assert reseeded["base_cache"]["reused"] == ["held-out pair log-probs"]  # samples depend on the seed
    assert reseeded["base_cache"]["stored"] == ["samples"]
    other_base = run_eval(tiny_model_dir, rule_data["eval"], base_cache=cache,
                                **{**opts, "ref_model": trained_dir})
    assert other_base["base_cache"]["reused"] == []
    assert len(json.loads(cache.read_text())["entries"]) == 2 + 1 + 2


def test_a_base_evaluated_alone_fills_the_cache_its_models_read(trained_dir, tiny_model_dir, rule_data, tmp_path,
                                                                monkeypatch):
    """``base_cache`` without a reference: the model is the cache's base. Its raw-preference results equal the
    uncached ones; its held-out pair log-probs are stored as the base's, and an evaluation against it then runs
    no base forward for the pairs (the recipe's raw evaluation of the base before its sweep)."""
    import preftune.evaluation.evaluate as ev

    cache = tmp_path / "base_cache.json"
    opts = dict(max_examples=16, batch_size=5, **LENGTHS)
    plain = run_eval(tiny_model_dir, rule_data["eval"], **opts)
    alone = run_eval(tiny_model_dir, rule_data["eval"], base_cache=cache, **opts)
    assert alone.pop("base_cache") == {"path": str(cache), "reused": [], "stored": ["held-out pair log-probs"]}
    assert alone == plain
    assert alone["preference"]["accuracy_definition"].startswith("raw log-prob preference")
    assert run_eval(tiny_model_dir, rule_data["eval"], base_cache=cache, **opts)["base_cache"]["reused"] == [
        "held-out pair log-probs"]

    calls = []
    real = ev.pair_logps
    monkeypatch.setattr(ev, "pair_logps", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    against = run_eval(trained_dir, rule_data["eval"], ref_model=tiny_model_dir, base_cache=cache, **opts)
    assert against.pop("base_cache")["reused"] == ["held-out pair log-probs"]
    assert len(calls) == 1  # the trained model's own pairs only
    monkeypatch.setattr(ev, "pair_logps", real)
    assert against == run_eval(trained_dir, rule_data["eval"], ref_model=tiny_model_dir, **opts)


def test_bad_requests_are_refused_before_loading(tiny_model_dir, rule_data):
    with pytest.raises(ValueError, match="needs --ref-model"):
        run_eval(tiny_model_dir, rule_data["eval"], generate=4)
    with pytest.raises(ValueError, match="also pass --generate"):
        run_eval(tiny_model_dir, rule_data["eval"], ref_model=tiny_model_dir, judge="python:os:getcwd")
    with pytest.raises(ValueError, match="unknown judge spec"):
        run_eval(tiny_model_dir, rule_data["eval"], ref_model=tiny_model_dir, generate=2, judge="gpt4")


def test_read_prompts_from_every_kind_of_file(tmp_path, rule_data):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    messages = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": "Say hi."}, {"prompt": messages},
            {"messages": messages + [{"role": "assistant", "content": "Hello"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(tmp_path / "p.jsonl") == ["Say hi.", messages, messages]
    implicit = read_prompts(rule_data["eval"], limit=2)  # implicit-prompt pairs: cut at "\n\nAssistant:"
    assert len(implicit) == 2 and all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in implicit)
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no prompt"):
        read_prompts(tmp_path / "bad.jsonl")


def parser():
    root = argparse.ArgumentParser(prog="preftune")
    register(root.add_subparsers(dest="command"))
    return root


def test_cli_eval_json_and_generate_pairs(tiny_model_dir, rule_data, judge_file, tmp_path, capsys):
    args = parser().parse_args(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir),
                                "--data", str(rule_data["eval"]), "--max-examples", "4", "--max-length", "64",
                                "--max-prompt-length", "32", "--json", "--output", str(tmp_path / "eval.json")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preference"]["pairs"] == 4 and printed["preference"]["dpo_loss"] == pytest.approx(math.log(2))
    assert json.loads((tmp_path / "eval.json").read_text()) == printed

    (tmp_path / "prompts.txt").write_text("The river is\nThe garden is\nThe ocean is\n")
    out = tmp_path / "pairs.jsonl"
    args = parser().parse_args(["generate", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"),
                                "--n", "4", "--judge", f"python:{judge_file}:length", "--out", str(out),
                                "--max-new-tokens", "8"])
    assert args.func(args) == 0
    message = capsys.readouterr().out
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"{len(pairs)} pairs from 3 prompts" in message
    assert len(pairs) >= 2  # a length judge rarely ties 4 random samples
    for pair in pairs:  # best vs worst of the n samples under the judge
        assert pair["prompt"].startswith("The ") and len(pair["chosen"]) > len(pair["rejected"])
    tokenizer = load_tokenizer(str(tiny_model_dir))  # the file reads as standard pairs, no bad record
    examples, report = load_dataset(out, tokenizer, "pair", max_length=64)
    assert report.rows_read == len(pairs) and report.bad_records == 0


def test_cli_help_has_examples(capsys):
    for command in ("eval", "generate", "compare"):
        with pytest.raises(SystemExit):
            parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "example" in text, command


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
    """A run killed mid-write leaves half a row at the end: the rows before it are read; a bad row
    elsewhere is an error naming its line."""
    from preftune.evaluation.sweep_report import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON object"):
        read_metrics(path)
