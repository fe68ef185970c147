"""Judges: python functions, a tiny reward model, and an OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from preftune.evaluation.judges.base import CompareResult, JudgeError
from preftune.evaluation.judges.openai import OpenAIJudge, parse_verdict
from preftune.evaluation.judges.python import PythonJudge
from preftune.evaluation.judges.registry import JUDGES, make_judge
from preftune.evaluation.judges.reward_model import RewardModelJudge
from preftune.model.tiny import tiny_config

# ----------------------------------------------------------------------------- python:

LENGTH_JUDGE = "def length(prompt, response):\n    return len(response)\n"


@pytest.fixture
def length_module(tmp_path, monkeypatch):
    (tmp_path / "length_judge_mod.py").write_text(LENGTH_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "length_judge_mod"


def test_python_judge_win_rate(length_module):
    """len(response) as the score: a is longer in 8 items, shorter in 2 -> rate 0.8.

    Wilson 95% interval for 8/10 (worked out in tests/evaluation/test_metrics.py): [0.490162, 0.943318].
    """
    judge = make_judge(f"python:{length_module}:length")
    assert isinstance(judge, PythonJudge)
    prompts = [f"q{i}" for i in range(10)]
    responses_a = ["long answer"] * 8 + ["a", "b"]
    responses_b = ["short"] * 8 + ["much longer", "also longer"]
    result = judge.compare(prompts, responses_a, responses_b)
    assert result.outcomes == [1.0] * 8 + [0.0] * 2
    assert (result.wins, result.losses, result.ties) == (8, 2, 0)
    rate = result.win_rate()
    assert rate.rate == pytest.approx(0.8)
    assert (rate.low, rate.high) == pytest.approx((0.490162, 0.943318), abs=1e-5)
    assert judge.score(["q"], ["abc"]) == [3.0]


def test_python_judge_from_a_file_and_ties(tmp_path):
    path = tmp_path / "judge_file.py"
    path.write_text(LENGTH_JUDGE)
    judge = make_judge(f"python:{path}:length")
    result = judge.compare(["p", "p"], ["ab", "x"], ["cd", "xyz"])
    assert result.outcomes == [0.5, 0.0] and result.ties == 1


def test_python_judge_message_prompts(tmp_path):
    path = tmp_path / "echo.py"
    path.write_text("def prompt_len(prompt, response):\n    return len(prompt)\n")
    judge = make_judge(f"python:{path}:prompt_len")
    assert judge.score([[{"role": "user", "content": "hi"}]], ["x"]) == [len("user: hi")]


def test_python_judge_must_return_a_number(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def words(prompt, response):\n    return response.split()\n")
    with pytest.raises(ValueError, match="must return a number"):
        make_judge(f"python:{path}:words").score(["p"], ["a b"])


@pytest.mark.parametrize("spec, message", [
    ("nope", "python:module:function"),
    ("python:", "reward-model:PATH"),
    ("python:no_such_module_xyz:f", "cannot import"),
    ("python:os:no_such_function", "no function"),
    ("python:missing/file.py:f", "not found"),
    ("openai:http://127.0.0.1:1/v1", "openai:URL#MODEL"),
    ("openai:ftp://x#m", "http://"),
    ("openai:http://x/v1#m?bogus=1", "unknown openai judge option"),
    ("openai:http://x/v1#m?max_retries=many", "not a valid int"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_judge(spec)


def test_unknown_spec_lists_every_form():
    with pytest.raises(ValueError) as info:
        make_judge("nope")
    assert all(form in str(info.value) for form in ("python:", "reward-model:", "openai:"))


@pytest.mark.parametrize("spec, kind", [("reward_model:./rm", "reward-model:"), ("pyhton:m:f", "python:"),
                                        ("open-ai:http://x/v1#m", "openai:")])
def test_misspelt_kind_suggests_the_known_one(spec, kind):
    with pytest.raises(ValueError, match=re.escape(f"did you mean {kind!r}?")) as info:
        make_judge(spec)
    assert all(form in str(info.value) for form in ("python:", "reward-model:", "openai:"))


def test_registry_maps_each_kind_to_its_class_and_form():
    assert JUDGES == {"python": PythonJudge, "reward-model": RewardModelJudge, "openai": OpenAIJudge}
    assert all(cls.spec_form.startswith(kind + ":") for kind, cls in JUDGES.items())
    assert "did you mean" not in _spec_error("nope")  # nothing close: the forms only


def _spec_error(spec: str) -> str:
    with pytest.raises(ValueError) as info:
        make_judge(spec)
    return str(info.value)


def test_lengths_must_match(length_module):
    with pytest.raises(ValueError, match="same length"):
        make_judge(f"python:{length_module}:length").compare(["p"], ["a", "b"], ["c"])


# ----------------------------------------------------------------------------- reward-model:


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    tokenizer = tiny_tokenizer
    config = tiny_config("llama", len(tokenizer), num_labels=1)  # pad_token_id=0 is <pad>
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_are_deterministic_and_compare_follows(reward_model_dir):
    judge = make_judge(f"reward-model:{reward_model_dir}")
    assert isinstance(judge, RewardModelJudge)
    prompts = ["Human: Name a colour. Assistant:"] * 3 + ["Human: hello"]
    responses_a = [" blue", " The sky is blue and the night is black.", " no", " hi"]
    responses_b = [" black", " yes", " The quick brown fox jumps over the lazy dog.", " hi"]
    scores_a, again = judge.score(prompts, responses_a), judge.score(prompts, responses_a)
    assert scores_a == again
    scores_b = judge.score(prompts, responses_b)
    expected = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores_a, scores_b)]
    result = judge.compare(prompts, responses_a, responses_b)
    assert result.outcomes == expected
    assert result.outcomes[3] == 0.5  # identical texts score identically


def test_reward_model_padding_does_not_change_scores(reward_model_dir):
    """Batched (padded) scores equal one-at-a-time scores: the head reads the last real token."""
    prompts = ["Human: hi", "Human: tell me a long story about the fox and the dog"]
    responses = [" ok", " The quick brown fox jumps over the lazy dog. A cat sat on the mat."]
    batched = make_judge(f"reward-model:{reward_model_dir}", batch_size=8).score(prompts, responses)
    single = make_judge(f"reward-model:{reward_model_dir}", batch_size=1).score(prompts, responses)
    assert batched == pytest.approx(single, abs=1e-5)


def test_reward_model_bad_path(tmp_path):
    with pytest.raises(ValueError, match="could not load the reward model"):
        make_judge(f"reward-model:{tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- openai:

_PAIR = re.compile(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nExplain", re.S)


class FakeJudgeServer(ThreadingHTTPServer):
    """Answers chat-completions requests by ``mode``; records paths, headers and bodies.

    modes: "longer" (the longer response wins, the correct judge), "always_a" (position
    bias), "garble" (no verdict when the prompt says GARBLE), "fail_first" (500 on the
    first request, then "longer"), "status:NNN" (always that status).
    """

    daemon_threads = True
    request_queue_size = 64  # the default 5 < max_concurrency 8: a dropped SYN costs a 1 s retransmit

    def __init__(self, mode: str):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.mode = mode
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        server: FakeJudgeServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            count = len(server.requests)
        user = body["messages"][-1]["content"]
        a, b = _PAIR.search(user).groups()
        if server.mode.startswith("status:"):
            return self.reply(int(server.mode[7:]), {"error": {"message": "nope"}})
        if server.mode == "fail_first" and count == 1:
            return self.reply(500, {"error": {"message": "overloaded"}})
        if server.mode == "always_a":
            content = "Both are fine, but I pick the first.\nWinner: A"
        elif server.mode == "garble" and "GARBLE" in user:
            content = "Hmm, hard to say. They are both responses."
        else:
            content = f"Reasoning: longer is better.\nWinner: {'A' if len(a) > len(b) else 'B'}"
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def reply(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(request):
    server = FakeJudgeServer(getattr(request, "param", "longer"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


FAST = "max_retries=2&retry_base_delay=0.001&timeout=5"
PROMPTS = ["Human: q1", "Human: q2", "Human: q3", "Human: q4"]
LONG = ["a long answer", "another long answer", "short", "a long answer again"]
SHORT = ["tiny", "small", "a much much longer answer", "x"]


def test_openai_judge_correct_pairwise_answers_and_key(judge_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test-123")
    judge = make_judge(f"openai:{judge_server.url}#judge-model?key_env=MY_KEY&{FAST}&max_concurrency=3")
    assert isinstance(judge, OpenAIJudge)
    result = judge.compare(PROMPTS, LONG, SHORT)
    assert result.outcomes == [1.0, 1.0, 0.0, 1.0]
    assert (result.ties, result.inconsistent, result.unparseable, result.errors) == (0, 0, 0, 0)
    assert len(judge_server.requests) == 8  # two orders per item
    assert {r["path"] for r in judge_server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in judge_server.requests} == {"Bearer sk-test-123"}
    assert {r["body"]["model"] for r in judge_server.requests} == {"judge-model"}


@pytest.mark.parametrize("judge_server", ["always_a"], indirect=True)
def test_position_biased_judge_gives_ties_not_wins(judge_server):
    result = make_judge(f"openai:{judge_server.url}#m?{FAST}").compare(PROMPTS, LONG, SHORT)
    assert result.outcomes == [0.5] * 4
    assert result.inconsistent == 4 and result.ties == 4 and result.wins == 0
    assert result.win_rate().rate == 0.5


@pytest.mark.parametrize("judge_server", ["garble"], indirect=True)
def test_malformed_reply_is_counted_unparseable(judge_server):
    prompts = ["Human: q1", "Human: GARBLE please", "Human: q3"]
    judge = make_judge(f"openai:{judge_server.url}#m?{FAST}&max_parse_retries=1")
    result = judge.compare(prompts, LONG[:3], SHORT[:3])
    assert result.outcomes == [1.0, 0.5, 0.0]
    assert (result.unparseable, result.ties, result.inconsistent, result.errors) == (1, 1, 0, 0)
    assert len(judge_server.requests) == 2 + 2 * 2 + 2  # the GARBLE item's two orders are asked twice each


@pytest.mark.parametrize("judge_server", ["fail_first"], indirect=True)
def test_server_error_is_retried(judge_server):
    judge = make_judge(f"openai:{judge_server.url}#m?{FAST}&max_concurrency=1")
    result = judge.compare(PROMPTS[:2], LONG[:2], SHORT[:2])
    assert result.outcomes == [1.0, 1.0] and result.errors == 0
    assert len(judge_server.requests) == 5  # 4 asks + 1 failed first try


@pytest.mark.parametrize("judge_server", ["status:503"], indirect=True)
def test_server_that_always_fails_raises(judge_server):
    judge = make_judge(f"openai:{judge_server.url}#m?{FAST}")
    with pytest.raises(JudgeError, match="every request"):
        judge.compare(PROMPTS[:1], LONG[:1], SHORT[:1])
    assert len(judge_server.requests) == 2 * 3  # two orders, 1 try + 2 retries each


@pytest.mark.parametrize("judge_server", ["status:401"], indirect=True)
def test_bad_key_fails_at_once(judge_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = make_judge(f"openai:{judge_server.url}#m?{FAST}&max_concurrency=1")
    with pytest.raises(JudgeError, match="401.*OPENAI_API_KEY"):
        judge.compare(PROMPTS[:1], LONG[:1], SHORT[:1])
    assert judge_server.requests[0]["auth"] is None  # default key variable unset: no header


def test_unreachable_server_counts_errors():
    """A closed port: connection refused on every try -> JudgeError (nothing answered)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    port = server.server_address[1]
    server.server_close()
    judge = make_judge(f"openai:http://127.0.0.1:{port}/v1#m?max_retries=1&retry_base_delay=0.001&timeout=2")
    with pytest.raises(JudgeError, match="every request"):
        judge.compare(["p"], ["a"], ["b"])


def test_endpoint_rule_and_key_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAIJudge("http://h:8000/v1", "m").endpoint == "http://h:8000/v1/chat/completions"
    assert OpenAIJudge("http://h:8000/v1/", "m").endpoint == "http://h:8000/v1/chat/completions"
    assert OpenAIJudge("http://h/v1/chat/completions", "m").endpoint == "http://h/v1/chat/completions"
    assert OpenAIJudge("http://h", "m").endpoint == "http://h/chat/completions"
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_KEY"):
        make_judge("openai:http://h/v1#m?key_env=NOT_SET_KEY")
    judge = make_judge("openai:http://h/v1#org/model-7b?max_concurrency=2", timeout=3.0)
    assert (judge.model, judge.max_concurrency, judge.timeout) == ("org/model-7b", 2, 3.0)


@pytest.mark.parametrize("reply, verdict", [
    ("Winner: A", "A"),
    ("Long reasoning about A and B.\n**Winner:** [B]", "B"),
    ("Response A is better.\nWinner: B", "B"),  # the final verdict line decides
    ("Verdict - Response A", "A"),
    ("B", "B"),
    ("**A**.", "A"),
    ("Some thoughts.\nResponse B", "B"),
    ("Winner: A or B", None),
    ("the winner is a tie", None),
    ("I cannot decide.", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_compare_result_counts():
    result = CompareResult(outcomes=[1.0, 0.0, 0.5, 1.0], ties=1)
    assert (result.n, result.wins, result.losses) == (4, 2, 1)
    assert result.win_rate().rate == pytest.approx(0.625)
