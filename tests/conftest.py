"""Shared fixtures: a tiny model + tokenizer saved to disk, and a synthetic rule task.

Nothing is downloaded: the tokenizer is trained on the fly and the model is a randomly
initialised Llama-architecture network from a transformers config.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch

from preftune.model.tiny import tiny_model, train_tokenizer
from preftune.recipes.real_config import DEFAULT_HH_DATA

HH_RLHF = DEFAULT_HH_DATA  # Anthropic HH-RLHF harmless test pairs, shipped with the package

# The rule: chosen replies use only "good" words, rejected replies contain a "bad" word.
GOOD = ["kind", "calm", "clear", "gentle", "honest", "warm", "bright", "fair"]
BAD = ["rude", "cruel", "harsh", "mean", "nasty", "vile", "cold", "grim"]
TOPICS = ["apple", "river", "mountain", "garden", "city", "ocean", "forest", "library", "music", "winter"]


def rule_pairs(n: int, seed: int) -> list[dict]:
    """Implicit-prompt dialogue pairs: the chosen reply follows the rule, the rejected breaks it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"\n\nHuman: Tell me about the {topic}.\n\nAssistant:"
        good = " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 5)))
        words = [rng.choice(GOOD) for _ in range(rng.randint(2, 5))]
        words[rng.randrange(len(words))] = rng.choice(BAD)
        rows.append({"chosen": f"{prompt} The {topic} is {good}.",
                     "rejected": f"{prompt} The {topic} is {' '.join(words)}."})
    return rows


def ranked_rule_groups(n: int, seed: int, bad_counts=(0, 1, 2, 3)) -> list[dict]:
    """The rule task ranked: per prompt one reply per entry of ``bad_counts``, in random order, with that many
    of its 3-5 words breaking the rule and scored minus that number (equal counts are tied responses)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        responses, scores = [], []
        for bad in rng.sample(list(bad_counts), len(bad_counts)):
            words = [rng.choice(GOOD) for _ in range(rng.randint(3, 5))]
            for i in rng.sample(range(len(words)), bad):
                words[i] = rng.choice(BAD)
            responses.append(f" The {topic} is {' '.join(words)}.")
            scores.append(-bad)
        rows.append({"prompt": f"\n\nHuman: Tell me about the {topic}.\n\nAssistant:", "responses": responses,
                     "scores": scores})
    return rows


def train_argv(options: dict) -> list[str]:
    """``preftune train`` arguments for TrainConfig field values: booleans as --flag / --no-flag,
    None left out."""
    args = ["train"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            args += [flag, str(value)]
    return args


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A python judge scoring the rule (for `python:FILE:rule_score` judge specs).
RULE_JUDGE_SOURCE = f'''
GOOD = {set(GOOD)!r}
BAD = {set(BAD)!r}

def rule_score(prompt, response):
    words = response.replace(".", " ").split()
    return sum(w in GOOD for w in words) - 2 * sum(w in BAD for w in words)
'''


def rule_corpus() -> list[str]:
    texts = [r["chosen"] + r["rejected"] for r in rule_pairs(200, seed=123)]
    return texts + [" ".join(GOOD + BAD + TOPICS)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(rule_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama (hidden 64, 2 layers) + tokenizer folder, loadable with from_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def rule_data(tmp_path_factory) -> dict[str, Path]:
    """Train (256 pairs) and held-out (64 pairs) files of the synthetic rule task."""
    folder = tmp_path_factory.mktemp("rule-data")
    return {"train": write_jsonl(folder / "train.jsonl", rule_pairs(256, seed=1)),
            "eval": write_jsonl(folder / "eval.jsonl", rule_pairs(64, seed=2))}


@pytest.fixture
def final_model(monkeypatch) -> dict:
    """After ``train()``, ``final_model["model"]`` is the in-memory trained model it saved."""
    import preftune.training.loop as train_module

    captured = {}
    original = train_module.save_final

    def spy(cfg, accelerator, model, tokenizer, out):
        captured["model"] = accelerator.unwrap_model(model).model
        return original(cfg, accelerator, model, tokenizer, out)

    monkeypatch.setattr(train_module, "save_final", spy)
    return captured


@pytest.fixture
def hh_rlhf_path() -> Path:
    return HH_RLHF


@pytest.fixture(autouse=True)
def _usual_ctrl_c():
    """Tests of Ctrl-C handling see Python's usual SIGINT handler even when the suite itself was
    started with SIGINT ignored (``make test &`` from a script, ``nohup``): training deliberately
    leaves an ignored SIGINT ignored (tests/integration/test_crash_safety.py checks that case on its own)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def _threads():
    """Two cores: keep intra-op threads at 2 so tests don't oversubscribe."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fp32_auto_precision(monkeypatch):
    """``--mixed-precision auto`` means fp32 in tests on every CPU: most tests assert fp32 exactness
    (packed vs padded, precompute vs live), which a CPU with AVX512-BF16 would otherwise turn into
    bf16 runs. tests/model/test_precision.py checks the auto rule itself with explicit cpuinfo text."""
    import preftune.model.precision

    monkeypatch.setattr(preftune.model.precision, "_host_has_fast_bf16", lambda: False)
    monkeypatch.setenv("PREFTUNE_CPU_BF16", "0")  # the same rule in the CLI runs tests start as subprocesses
