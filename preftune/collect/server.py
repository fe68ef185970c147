"""The labelling web app: FastAPI routes over :class:`~preftune.collect.store.LabelStore`, served by
uvicorn; the page is plain HTML + JavaScript (``page.html``, ``page.js``, ``page.css``, no build step).

Routes (JSON in and out; every ``/api`` call needs the token when one is set)::

    GET  /                 the page (``?annotator=NAME[&token=...]``)
    GET  /page.js, /page.css
    GET  /api/health       {"ok": true}
    GET  /api/config       guidelines, title
    POST /api/next         {"annotator"} -> {"task", "progress"}
    POST /api/label        {"annotator", "task_id", "display_order", "choice", "ranking", "reason"}
                           -> the label is committed, then {"saved", "task" (the next), "progress"}
    POST /api/undo         {"annotator"} -> {"undone", "task", "progress"}

Security: the server binds 127.0.0.1 unless a host is given, and then a token is required (one is
made up and printed if none is given); without ``--host`` only ``Host: 127.0.0.1`` / ``localhost``
is answered (no DNS rebinding). POSTs need ``Content-Type: application/json``, an ``Origin`` (when
sent) equal to the server's own, and the token in ``X-Preftune-Token``. A body is read whole
(with a Content-Length or chunked) before the app sees it (:mod:`preftune.collect.bodies`): over
:data:`MAX_BODY_BYTES` it is refused with 413; not UTF-8 JSON, or holding a number that is not
finite or past SQLite's 64-bit integers, with 400; and fields are bounded (annotator names,
reasons, rankings: 422). Every refusal is ``{"detail": "one line"}`` and stores nothing. The page
renders every text with ``textContent`` (never as HTML), under a
Content-Security-Policy that allows only the page's own script and style.
"""

from __future__ import annotations

import hmac
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

try:
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"the labelling app needs FastAPI and uvicorn ({err}); pip install 'preftune[label]'") from err

from preftune.collect.bodies import HardenedApp, json_body
from preftune.collect.candidates import MAX_RANKED, file_sha256, read_tasks
from preftune.collect.store import MAX_SQLITE_INT, LabelStore, ServerLock, Shown, StoreError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000
ANNOTATOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
TOKEN_HEADER = "x-preftune-token"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
PAGE_FILES = {"page.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
              "page.css": "text/css; charset=utf-8"}


@dataclass
class Settings:
    overlap: int = 1
    token: str | None = None  # required on every /api call when set
    allowed_hosts: tuple[str, ...] = tuple(LOOPBACK_HOSTS)  # ("*",) when bound to a chosen --host
    guidelines: str = ""
    title: str = "preftune label"
    seed: int | None = None  # response order; None: fresh randomness


class Who(BaseModel):
    """A request body naming the annotator. Strict: numbers are JSON integers, never floats or booleans."""

    model_config = ConfigDict(extra="forbid", strict=True)
    annotator: str = Field(pattern=ANNOTATOR_PATTERN)


Position = Annotated[int, Field(ge=0, lt=MAX_RANKED)]  # a response's index or display position


class LabelIn(Who):
    """A label as the page sends it: sides / display positions, mapped to canonical indices by the store."""

    task_id: int = Field(ge=0, le=MAX_SQLITE_INT)
    display_order: list[Position] = Field(max_length=MAX_RANKED)
    choice: str = Field(max_length=8)
    ranking: list[Position] | None = Field(default=None, max_length=MAX_RANKED)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


def create_app(store: LabelStore, settings: Settings):
    """The ASGI app (FastAPI) for ``store``."""
    rng = random.Random(settings.seed) if settings.seed is not None else random.SystemRandom()
    pages = {name: (Path(__file__).with_name(name).read_bytes(), media) for name, media in PAGE_FILES.items()}

    def guard(request: Request) -> None:
        """Token (when set) on every API call; same-origin JSON for POSTs."""
        if settings.token is not None:
            given = request.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), settings.token.encode()):
                raise HTTPException(401, "a valid token is required: open the link with &token=... that the "
                                         "server printed")
        if request.method == "POST":
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise HTTPException(415, "send JSON (Content-Type: application/json)")
            origin = request.headers.get("origin")
            host = request.headers.get("host", "")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                raise HTTPException(403, f"cross-origin request refused (Origin {origin})")
            site = request.headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                raise HTTPException(403, "cross-site request refused")

    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StoreError)
    def store_error(request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(sqlite3.Error)
    def database_error(request, exc: sqlite3.Error):
        log.error("the labels database %s failed: %s", store.path, exc)
        return JSONResponse({"detail": f"the labels database could not be used ({exc}); nothing was saved: "
                                       "try again, and tell whoever runs the server"}, status_code=503)

    def page(name: str) -> Response:
        body, media = pages[name]
        return Response(body, media_type=media)

    @app.get("/", include_in_schema=False)
    def index():
        return page("page.html")

    @app.get("/page.js", include_in_schema=False)
    def script():
        return page("page.js")

    @app.get("/page.css", include_in_schema=False)
    def style():
        return page("page.css")

    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.get("/api/config", dependencies=[Depends(guard)])
    def config():
        return {"title": settings.title, "guidelines": settings.guidelines, "overlap": settings.overlap}

    def answer(annotator: str, **extra) -> dict:
        shown = store.next_task(annotator, settings.overlap, rng)
        return {**extra, "task": _task_json(shown), "progress": store.progress(annotator, settings.overlap)}

    @app.post("/api/next", dependencies=[Depends(guard)])
    def next_task(body: Who = Depends(json_body(Who))):
        return answer(body.annotator)

    @app.post("/api/label", dependencies=[Depends(guard)])
    def label(body: LabelIn = Depends(json_body(LabelIn))):
        saved = store.submit(body.annotator, body.task_id, body.display_order, body.choice, body.ranking,
                             body.reason.strip())
        return answer(body.annotator, saved=saved)  # committed above, before the next task is chosen

    @app.post("/api/undo", dependencies=[Depends(guard)])
    def undo(body: Who = Depends(json_body(Who))):
        return answer(body.annotator, undone=store.undo(body.annotator))

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    return HardenedApp(app, MAX_BODY_BYTES, SECURITY_HEADERS)


def _task_json(shown: Shown | None) -> dict | None:
    """What the page sees of a task: no meta, responses in the order shown."""
    if shown is None:
        return None
    task = shown.task
    return {"task_id": shown.task_id, "mode": task.mode, "prompt": task.prompt, "display_order": shown.display_order,
            "responses": [task.responses[i] for i in shown.display_order]}


# ----------------------------------------------------------------------------- serving


def serve(candidates: str | os.PathLike, db: str | os.PathLike, host: str | None = None, port: int = 8765,
          overlap: int = 1, guidelines: str | os.PathLike | None = None, token: str | None = None,
          mode: str = "auto", seed: int | None = None, annotators: list[str] | None = None) -> int:
    """Check the candidates, open the store, print the annotators' links and serve until stopped.

    Every problem that can be found before serving is a ``ValueError`` / ``DataError`` here, raised
    before the socket listens: a bad candidates line (``file:line``), a candidates path that is a
    folder or cannot be read, a guidelines file that cannot be read, a ``db`` that is a folder or
    that SQLite cannot open or write (its lock file included), a database made from another file,
    a second server on the same database, a port in use.
    """
    try:
        import uvicorn
    except ImportError as err:
        raise ValueError(f"the labelling app needs uvicorn ({err}); pip install 'preftune[label]'") from None
    if overlap < 1:
        raise ValueError(f"--overlap must be >= 1, got {overlap}")
    for name in annotators or []:
        if not re.match(ANNOTATOR_PATTERN, name):
            raise ValueError(f"annotator name {name!r}: use letters, digits and _ . @ - (at most 64, starting with a "
                             "letter or digit)")
    if Path(db).expanduser().resolve() == Path(candidates).expanduser().resolve():
        raise ValueError("--db is the candidates file; the candidates file is never written: choose another --db")
    sha256 = file_sha256(candidates)
    tasks = read_tasks(candidates, mode)
    if file_sha256(candidates) != sha256:
        raise ValueError(f"{os.fspath(candidates)} changed while it was read; try again once it is written")
    guidelines_text = _read_guidelines(guidelines)
    if host is not None and not token:
        token = secrets.token_urlsafe(18)
    bind = host or "127.0.0.1"
    lock = ServerLock(db)
    sock = None
    try:
        sock = _bind(bind, port)  # bound now (a port in use is refused before --db is made), listening below
        store = LabelStore(db)
        store.load_tasks(tasks, candidates, sha256, mode)
        settings = Settings(overlap=overlap, token=token, allowed_hosts=("*",) if host is not None
                            else tuple(LOOPBACK_HOSTS), guidelines=guidelines_text, seed=seed)
        app = create_app(store, settings)
        _listen(sock, bind, port)
        _print_links(tasks, candidates, db, overlap, bind, sock.getsockname()[1], token, annotators)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                                limit_concurrency=64, h11_max_incomplete_event_size=16 * 1024)
        uvicorn.Server(config).run(sockets=[sock])
        store.close()
    finally:
        lock.release()
        if sock is not None:
            sock.close()
    return 0


def _read_guidelines(path: str | os.PathLike | None) -> str:
    """The ``--guidelines`` text ("" without one); ``ValueError`` naming the file when it cannot be read."""
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)}: is a folder; --guidelines takes a text file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text (byte {err.start + 1}); --guidelines takes a text "
                         "file") from None
    except OSError as err:
        raise ValueError(f"{os.fspath(path)}: cannot read the guidelines ({err.strerror or err})") from None


def _print_links(tasks, candidates, db, overlap: int, bind: str, port: int, token: str | None,
                 annotators: list[str] | None) -> None:
    """What is served, and each annotator's link."""
    shown_host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    base = f"http://{'[' + shown_host + ']' if ':' in shown_host else shown_host}:{port}/"
    counts = {m: sum(t.mode == m for t in tasks) for m in ("pair", "rank", "thumbs")}
    print(f"{len(tasks)} tasks ({', '.join(f'{n} {m}' for m, n in counts.items() if n)}) from "
          f"{os.fspath(candidates)}; labels go to {os.fspath(db)} (overlap {overlap})")
    for name in annotators or ["NAME"]:
        print(f"  {base}?{urlencode({'annotator': name, **({'token': token} if token else {})})}")
    print("serving; Ctrl-C stops (every submitted label is already saved)", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, not yet listening; ``ValueError`` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None
    return sock


def _listen(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.listen(128)
    except OSError as err:  # another socket took the port between bind and listen
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None
