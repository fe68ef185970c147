"""The labelling app over HTTP: the API, its security checks, and the real server in a subprocess
(kill -9 loses nothing, a second server is refused, --host needs a token, bad candidates stop it)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from preftune.cli.main import main
from preftune.collect import server as server_module
from preftune.collect.candidates import file_sha256, read_tasks
from preftune.collect.server import Settings, create_app
from preftune.collect.store import LabelStore

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
ROWS = [{"prompt": f"prompt {i}", "responses": [f"left-or-right {i}", f"other {i}"]} for i in range(5)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def client(tmp_path, rows=ROWS, **settings) -> TestClient:
    candidates = write(tmp_path / "candidates.jsonl", rows)
    store = LabelStore(tmp_path / "labels.sqlite")
    store.load_tasks(read_tasks(candidates), candidates, file_sha256(candidates), "auto")
    return TestClient(create_app(store, Settings(seed=0, **settings)), base_url="http://127.0.0.1:8765")


def label(c: TestClient, annotator: str, task: dict, choice: str, **extra) -> dict:
    r = c.post("/api/label", json={"annotator": annotator, "task_id": task["task_id"],
                                   "display_order": task["display_order"], "choice": choice}, **extra)
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- in-process API


def test_label_flow_and_progress(tmp_path):
    c = client(tmp_path, overlap=2)
    first = c.post("/api/next", json={"annotator": "ann"}).json()
    assert first["task"]["task_id"] == 0 and first["progress"]["left_for_you"] == 5
    assert "meta" not in first["task"]  # the page never sees a candidate's meta
    left_text = first["task"]["responses"][0]
    after = label(c, "ann", first["task"], "left")
    assert after["saved"] == 1 and after["task"]["task_id"] == 1
    assert after["progress"] == {"labelled_by_you": 1, "left_for_you": 4, "tasks": 5, "tasks_complete": 0,
                                 "labels": 1, "overlap": 2}
    undone = c.post("/api/undo", json={"annotator": "ann"}).json()
    assert undone["undone"] == 0 and undone["task"] == first["task"]
    label(c, "ann", undone["task"], "right")
    bob = c.post("/api/next", json={"annotator": "bob"}).json()
    assert bob["task"]["task_id"] == 0  # overlap 2: bob gets it too
    store = LabelStore(tmp_path / "labels.sqlite", readonly=True)
    (saved,) = store.labels()
    right_text = [t for t in first["task"]["responses"] if t != left_text][0]
    assert store.tasks()[0].responses[saved.winner] == right_text
    assert c.get("/api/config").json() == {"title": "preftune label", "guidelines": "", "overlap": 2}


def test_page_and_security_headers(tmp_path):
    c = client(tmp_path)
    page = c.get("/")
    assert page.status_code == 200 and '<script src="page.js" defer></script>' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert c.get("/page.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/api/health").json() == {"ok": True}
    assert c.get("/docs").status_code == 404


def test_page_script_never_renders_html():
    """Texts go in with textContent / createTextNode only; the page script never parses HTML."""
    source = (Path(server_module.__file__).with_name("page.js")).read_text()
    for sink in ("innerHTML =", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, sink
    assert "textContent" in source


def test_requests_are_checked(tmp_path):
    c = client(tmp_path)
    ok = {"annotator": "ann"}
    assert c.post("/api/next", json={"annotator": "../../etc"}).status_code == 422
    assert c.post("/api/next", json={"annotator": "x" * 65}).status_code == 422
    assert c.post("/api/next", json={"annotator": "ann", "extra": 1}).status_code == 422
    assert c.post("/api/next", content=json.dumps(ok), headers={"content-type": "text/plain"}).status_code == 415
    assert c.post("/api/next", json=ok, headers={"origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/next", json=ok, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert c.post("/api/next", json=ok, headers={"origin": "http://127.0.0.1:8765"}).status_code == 200
    big = c.post("/api/next", content=b'{"annotator": "' + b"a" * 70_000 + b'"}',
                 headers={"content-type": "application/json"})
    assert big.status_code == 413
    task = c.post("/api/next", json=ok).json()["task"]
    long_reason = c.post("/api/label", json={"annotator": "ann", "task_id": task["task_id"],
                                             "display_order": task["display_order"], "choice": "left",
                                             "reason": "r" * 2001})
    assert long_reason.status_code == 422
    wrong = c.post("/api/label", json={"annotator": "bob", "task_id": task["task_id"],
                                       "display_order": task["display_order"], "choice": "left"})
    assert wrong.status_code == 409 and "not shown" in wrong.json()["detail"]
    # DNS rebinding: a page on another name resolving to 127.0.0.1 gets nothing
    other = TestClient(c.app, base_url="http://attacker.example:8765")
    assert other.get("/").status_code == 400 and other.post("/api/next", json=ok).status_code == 400


def test_token_is_required_when_set(tmp_path):
    c = client(tmp_path, token="s3cret", allowed_hosts=("*",))
    assert c.post("/api/next", json={"annotator": "ann"}).status_code == 401
    assert c.get("/api/config").status_code == 401
    bad = c.post("/api/next", json={"annotator": "ann"}, headers={"x-preftune-token": "guess"})
    assert bad.status_code == 401
    good = c.post("/api/next", json={"annotator": "ann"}, headers={"x-preftune-token": "s3cret"})
    assert good.status_code == 200
    assert c.get("/").status_code == 200  # the page itself holds no data


def test_xss_candidate_is_sent_as_plain_json(tmp_path):
    c = client(tmp_path, rows=[{"prompt": XSS, "responses": [XSS, "fine"]}])
    task = c.post("/api/next", json={"annotator": "ann"}).json()["task"]
    assert task["prompt"] == XSS and XSS in task["responses"]


def test_serve_binds_loopback_unless_a_host_is_given(tmp_path, monkeypatch, capsys):
    """serve() up to uvicorn: the socket it hands over, and the links it prints."""
    import uvicorn

    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: bound.append(sockets[0].getsockname()))
    monkeypatch.delenv("PREFTUNE_LABEL_TOKEN", raising=False)
    candidates = write(tmp_path / "c.jsonl", ROWS)
    assert main(["label", "serve", str(candidates), "--db", str(tmp_path / "a.sqlite"), "--port", "0"]) == 0
    assert bound[-1][0] == "127.0.0.1"
    printed = capsys.readouterr().out
    assert re.search(r"http://127\.0\.0\.1:\d+/\?annotator=NAME\n", printed) and "token" not in printed
    assert main(["label", "serve", str(candidates), "--db", str(tmp_path / "b.sqlite"), "--port", "0",
                 "--host", "127.0.0.2", "--annotators", "ann,bob"]) == 0
    assert bound[-1][0] == "127.0.0.2"
    printed = capsys.readouterr().out
    tokens = re.findall(r"\?annotator=(ann|bob)&token=([\w-]{20,})", printed)
    assert [name for name, _ in tokens] == ["ann", "bob"] and tokens[0][1] == tokens[1][1]
    assert main(["label", "serve", str(candidates), "--db", str(tmp_path / "c.sqlite"), "--annotators", "ann,b&b"]) == 1
    assert "annotator name 'b&b'" in capsys.readouterr().err


def test_bad_candidates_stop_the_server_before_it_starts(tmp_path, capsys):
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "p", "responses": "not a list"}\n')
    db = tmp_path / "labels.sqlite"
    assert main(["label", "serve", str(candidates), "--db", str(db)]) == 1
    assert capsys.readouterr().err.strip() == (f"preftune: error: {candidates}:2: field 'responses' must be a "
                                               "non-empty list of texts or message lists")
    assert not db.exists()
    assert main(["label", "serve", str(candidates), "--db", str(candidates)]) == 1


@pytest.fixture
def never_serves(monkeypatch):
    """uvicorn's run replaced by a recorder: a refused start must never reach it."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: started.append(sockets))
    monkeypatch.delenv("PREFTUNE_LABEL_TOKEN", raising=False)
    return started


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def refuse_open(monkeypatch, module, path: Path) -> None:
    """``open(path)`` in ``module`` raises PermissionError, as it does for a user without the right
    (tests run as root, for whom chmod alone refuses nothing)."""
    import builtins

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_serve_refuses_a_folder_or_unreadable_candidates_in_one_line(tmp_path, capsys, monkeypatch, never_serves):
    from preftune.collect import candidates as candidates_module

    db = tmp_path / "labels.sqlite"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["label", "serve", str(folder), "--db", str(db)]) == 1
    one_line_error(capsys, f"{folder}: is a folder")
    unreadable = write(tmp_path / "c.jsonl", ROWS)
    unreadable.chmod(0)
    with monkeypatch.context() as patch:
        refuse_open(patch, candidates_module, unreadable)
        assert main(["label", "serve", str(unreadable), "--db", str(db)]) == 1
    one_line_error(capsys, str(unreadable), "Permission denied")
    unreadable.chmod(0o644)
    guidelines = tmp_path / "guide"
    guidelines.mkdir()
    assert main(["label", "serve", str(unreadable), "--db", str(db), "--guidelines", str(guidelines)]) == 1
    one_line_error(capsys, f"{guidelines}", "is a folder")
    assert not never_serves and not db.exists()


def test_serve_refuses_a_database_it_cannot_open_in_one_line(tmp_path, capsys, monkeypatch, never_serves):
    candidates = write(tmp_path / "c.jsonl", ROWS)
    folder = tmp_path / "dbs"
    folder.mkdir()
    assert main(["label", "serve", str(candidates), "--db", str(folder)]) == 1  # a folder given as --db
    one_line_error(capsys, f"{folder}", "is a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    db = readonly / "labels.sqlite"
    # SQLite cannot make the file (what a non-root user gets in a read-only folder; root is let in, so
    # the refusal is simulated as well as set up)
    real_connect = sqlite3.connect

    def refused_connect(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(db):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", refused_connect)
        assert main(["label", "serve", str(candidates), "--db", str(db)]) == 1
    one_line_error(capsys, str(db), "unable to open database file")
    # the lock file beside it cannot be made either
    from preftune.collect import store as store_module

    with monkeypatch.context() as patch:
        refuse_open(patch, store_module, Path(f"{db}.lock"))
        assert main(["label", "serve", str(candidates), "--db", str(db)]) == 1
    one_line_error(capsys, f"{db}.lock", "Permission denied")
    readonly.chmod(0o755)
    assert not never_serves
    assert main(["label", "serve", str(candidates), "--db", str(db), "--port", "0"]) == 0  # nothing was left held
    assert len(never_serves) == 1


def raw(c: TestClient, body, path: str = "/api/label") -> httpx.Response:
    """POST ``body`` (bytes, or an iterator of byte chunks: sent chunked) as it is."""
    return c.post(path, content=body, headers={"content-type": "application/json"})


def refusal(response: httpx.Response, status: int, *words: str) -> str:
    """The one-line JSON message of a 4xx answer, checked for ``words``."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    for word in words:
        assert word in detail, detail
    return detail


@pytest.mark.parametrize("body, status, words", [
    (b'{"annotator": "ann", "task_id": 100000000000000000000000000, "display_order": [0, 1], "choice": "left"}',
     400, ["100000000000000000000000000", "out of range"]),
    (b'{"annotator": "ann", "task_id": 9223372036854775808, "display_order": [0, 1], "choice": "left"}',
     400, ["9223372036854775808", "out of range"]),
    (b'{"annotator": "ann", "task_id": 1e26, "display_order": [0, 1], "choice": "left"}', 422, ["task_id"]),
    (b'{"annotator": "ann", "task_id": 0, "display_order": [1e400, 1], "choice": "left"}', 400, ["1e400"]),
    (b'{"annotator": "ann", "task_id": 0, "display_order": [NaN, 1], "choice": "left"}', 400, ["NaN"]),
    (b'{"annotator": "ann", "task_id": -Infinity, "display_order": [0, 1], "choice": "left"}', 400, ["Infinity"]),
    (b'{"annotator": "ann", "task_id": ' + b"9" * 5000 + b', "display_order": [0, 1], "choice": "left"}',
     400, ["out of range"]),
    (b'{"annotator": "ann", "task_id": true, "display_order": [0, 1], "choice": "left"}', 422, ["task_id"]),
    (b'{"annotator": "ann", "task_id": 0, "display_order": [0, 1e26], "choice": "left"}', 422, ["display_order"]),
    (b'{"annotator": "ann", "task_id": 0, "display_order": [0, 1], "choice": "left", "reason": 1e999}', 400,
     ["1e999"]),
    (b'{"annotator": "ann", "task_id": 0, "display_order": [0, 1], "choice": "left"', 400, ["not valid JSON"]),
])
def test_numbers_out_of_range_are_refused_and_nothing_is_stored(tmp_path, body, status, words):
    """JSON numbers SQLite cannot hold (past int64) or that are not finite: a 4xx naming the value, not a 500."""
    c = client(tmp_path)
    c = TestClient(c.app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    task = c.post("/api/next", json={"annotator": "ann"}).json()["task"]
    assert task["task_id"] == 0
    refusal(raw(c, body), status, *words)
    assert LabelStore(tmp_path / "labels.sqlite", readonly=True).labels() == []  # nothing stored
    after = label(c, "ann", task, "left")  # and the server goes on
    assert after["saved"] == 1 and len(LabelStore(tmp_path / "labels.sqlite", readonly=True).labels()) == 1


def test_chunked_bodies_are_read_up_to_the_limit(tmp_path):
    """A body without Content-Length (chunked) is read like any other: accepted within
    MAX_BODY_BYTES, 413 naming the limit past it."""
    c = client(tmp_path)
    limit = server_module.MAX_BODY_BYTES

    def chunks(body: bytes, size: int = 8192):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    small = raw(c, chunks(b'{"annotator": "ann"}'), "/api/next")
    assert small.status_code == 200 and small.json()["task"]["task_id"] == 0
    padded = b'{"annotator": "ann"' + b" " * (limit - 40) + b"}"  # just under the limit, in 8 chunks
    assert len(padded) <= limit
    assert raw(c, chunks(padded), "/api/next").status_code == 200
    over = b'{"annotator": "ann"' + b" " * limit + b"}"
    refusal(raw(c, chunks(over), "/api/next"), 413, f"{limit} bytes")
    refusal(raw(c, over, "/api/next"), 413, f"{limit} bytes")  # the same with a Content-Length
    assert c.post("/api/next", json={"annotator": "ann"}).status_code == 200


def test_a_body_that_is_not_utf8_is_refused_as_such(tmp_path):
    c = client(tmp_path)
    body = '{"annotator": "ann", "reason": "caf\u00e9"}'.encode("latin-1")
    refusal(raw(c, body, "/api/next"), 400, "UTF-8 JSON")
    refusal(raw(c, b"\xff\xfe" + '{"annotator": "ann"}'.encode("utf-16-le"), "/api/next"), 400, "UTF-8 JSON")
    assert c.post("/api/next", json={"annotator": "ann"}).status_code == 200


def test_schema_errors_are_one_line(tmp_path):
    c = client(tmp_path)
    detail = refusal(c.post("/api/next", json={"annotator": "../x"}), 422, "annotator")
    assert len(detail) < 300
    refusal(c.post("/api/next", json=["ann"]), 422)
    refusal(c.post("/api/next", json={}), 422, "annotator")


def test_a_database_failing_while_serving_is_a_503_not_a_traceback(tmp_path, monkeypatch):
    c = client(tmp_path)
    c = TestClient(c.app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    task = c.post("/api/next", json={"annotator": "ann"}).json()["task"]

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(LabelStore, "submit", disk_full)
    r = c.post("/api/label", json={"annotator": "ann", "task_id": task["task_id"],
                                   "display_order": task["display_order"], "choice": "left"})
    refusal(r, 503, "database or disk is full", "nothing was saved")


# ----------------------------------------------------------------------------- the real server


class Server:
    """``preftune label serve`` in a subprocess on a free port; ``url`` once it listens."""

    def __init__(self, candidates: Path, db: Path, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("PREFTUNE_LABEL_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "preftune", "label", "serve", str(candidates),
                                      "--db", str(db), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"server exited {self.proc.wait()}: {self.proc.stderr.read()}")
            self.stdout.append(line)
            if line.startswith("serving"):
                match = re.search(r"(http://127\.0\.0\.1:\d+)/", "".join(self.stdout))
                self.url = match.group(1)
                return self.url
        raise AssertionError(f"server not ready after {timeout} s: {''.join(self.stdout)}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


@pytest.fixture
def servers():
    started: list[Server] = []
    yield lambda *args: started.append(Server(*args)) or started[-1]
    for s in started:
        s.stop(signal.SIGKILL)


def post(url: str, path: str, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"x-preftune-token": token} if token else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def test_kill_9_loses_no_label_and_a_restart_carries_on(tmp_path, servers):
    candidates = write(tmp_path / "candidates.jsonl", ROWS)
    digest = hashlib.sha256(candidates.read_bytes()).hexdigest()
    db = tmp_path / "labels.sqlite"
    server = servers(candidates, db)
    url = server.wait_ready()
    task = post(url, "/api/next", {"annotator": "ann"}).json()["task"]
    acknowledged = []
    for choice in ("left", "right", "tie"):
        r = post(url, "/api/label", {"annotator": "ann", "task_id": task["task_id"],
                                     "display_order": task["display_order"], "choice": choice})
        assert r.status_code == 200
        acknowledged.append((task["task_id"], choice))
        task = r.json()["task"]
    waiting = task  # shown to ann, not labelled yet
    server.proc.kill()  # SIGKILL: no shutdown code runs
    assert server.proc.wait(timeout=30) == -signal.SIGKILL
    rows = sqlite3.connect(db).execute("SELECT task_id, choice FROM labels WHERE undone_at IS NULL "
                                       "ORDER BY id").fetchall()
    assert [(t, c) for t, c in rows] == [(0, "prefer"), (1, "prefer"), (2, "tie")]
    again = servers(candidates, db)  # the lock died with the process
    url = again.wait_ready()
    resumed = post(url, "/api/next", {"annotator": "ann"}).json()
    assert resumed["task"] == waiting  # the same task, in the same order
    assert resumed["progress"]["labelled_by_you"] == 3
    assert hashlib.sha256(candidates.read_bytes()).hexdigest() == digest  # never written


def test_a_second_server_on_the_same_database_is_refused(tmp_path, servers):
    candidates = write(tmp_path / "candidates.jsonl", ROWS)
    db = tmp_path / "labels.sqlite"
    first = servers(candidates, db)
    url = first.wait_ready()
    second = subprocess.run([sys.executable, "-m", "preftune", "label", "serve", str(candidates), "--db", str(db),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"{db} is already being served (pid {first.proc.pid})" in second.stderr
    assert post(url, "/api/next", {"annotator": "ann"}).status_code == 200  # the first one is unharmed
    other = write(tmp_path / "other.jsonl", ROWS[:2])
    first.stop()
    refused = subprocess.run([sys.executable, "-m", "preftune", "label", "serve", str(other), "--db", str(db),
                              "--port", "0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "different file or mode: use another --db" in refused.stderr


def test_host_flag_requires_the_token(tmp_path, servers):
    candidates = write(tmp_path / "candidates.jsonl", ROWS)
    server = servers(candidates, tmp_path / "labels.sqlite", "--host", "127.0.0.1", "--token", "t0ken-for-test")
    url = server.wait_ready()
    assert "&token=t0ken-for-test" in "".join(server.stdout)
    assert post(url, "/api/next", {"annotator": "ann"}).status_code == 401
    assert post(url, "/api/next", {"annotator": "ann"}, token="wrong").status_code == 401
    assert post(url, "/api/next", {"annotator": "ann"}, token="t0ken-for-test").status_code == 200


def test_the_real_server_refuses_bad_bodies_in_one_line_and_keeps_serving(tmp_path, servers):
    """Through uvicorn: a chunked body within the limit is read, one past it is 413, non-UTF-8 and
    out-of-range numbers are 400; no traceback, nothing stored, the next label is saved."""
    db = tmp_path / "labels.sqlite"
    server = servers(write(tmp_path / "candidates.jsonl", ROWS), db)
    url = server.wait_ready()
    headers = {"content-type": "application/json"}

    def chunked(body: bytes):
        yield from (body[i:i + 4096] for i in range(0, len(body), 4096))

    limit = server_module.MAX_BODY_BYTES
    near = b'{"annotator": "ann"' + b" " * (limit - 40) + b"}"
    task = httpx.post(url + "/api/next", content=chunked(near), headers=headers, timeout=30).json()["task"]
    over = httpx.post(url + "/api/next", content=chunked(near + b" " * 100), headers=headers, timeout=30)
    refusal(over, 413, f"{limit} bytes")
    latin = httpx.post(url + "/api/next", content='{"annotator": "\u00e9"}'.encode("latin-1"), headers=headers,
                       timeout=30)
    refusal(latin, 400, "UTF-8 JSON")
    for bad in (b'"task_id": 100000000000000000000000000, "display_order": [0, 1]',
                b'"task_id": 0, "display_order": [1e400, 1]'):
        body = b'{"annotator": "ann", "choice": "left", ' + bad + b"}"
        refusal(httpx.post(url + "/api/label", content=body, headers=headers, timeout=30), 400, "out of range")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 0
    r = post(url, "/api/label", {"annotator": "ann", "task_id": task["task_id"],
                                 "display_order": task["display_order"], "choice": "left"})
    assert r.status_code == 200 and r.json()["saved"] == 1
    server.stop()
    assert "Traceback" not in server.proc.stderr.read()
