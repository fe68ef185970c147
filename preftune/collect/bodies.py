"""Request bodies of the labelling app, checked before a route sees them.

Two steps, one function each: :func:`read_body` (under :class:`HardenedApp`, the ASGI wrapper)
reads the whole body, sent with a Content-Length or chunked, up to a byte limit (413 past it);
:func:`parse_body` (through the :func:`json_body` dependency, in place of FastAPI's own body
parsing) turns it into a pydantic model: UTF-8 JSON whose numbers are finite and fit SQLite's
64-bit integers (400 otherwise), then the model's checks (422). Every refusal is
``{"detail": "one line"}`` that never echoes the body.
"""

from __future__ import annotations

import json
import math

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

from preftune.collect.store import MAX_SQLITE_INT


class HardenedApp:
    """ASGI wrapper: ``headers`` added to every response, and the request body read whole before
    the app sees it, up to ``max_body`` bytes (413 past it, by the declared Content-Length or, for
    a chunked body, by the bytes received)."""

    def __init__(self, app, max_body: int, headers: list[tuple[bytes, bytes]]):
        self.app, self.max_body, self.headers = app, max_body, headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_hardened(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _too_large(send_hardened, self.max_body)
        try:
            body = await read_body(receive, self.max_body)
        except _TooLarge:
            return await _too_large(send_hardened, self.max_body)
        except _ClientGone:
            return None
        return await self.app(scope, _replay(body, receive), send_hardened)


async def read_body(receive, limit: int) -> bytes:
    """Every byte of the request body from the ASGI ``receive``, however it was sent (one piece
    with a Content-Length, or chunked); ``_TooLarge`` past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives the app ``body`` in one message, then passes on to ``receive``
    (which then only reports the client going away)."""
    given = False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body too large: the limit is {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def parse_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body -> ``model``: UTF-8 JSON whose numbers are finite and fit SQLite's 64-bit
    integers, then the model's checks. ``HTTPException`` 400 for a body that is not such JSON,
    422 for one the model refuses; the message is one line and never echoes the body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HTTPException(400, f"the request body must be UTF-8 JSON (byte {err.start + 1} is not UTF-8)") from None
    try:
        value = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except _BadNumber as err:
        raise HTTPException(400, f"the request body holds {err}") from None
    except RecursionError:
        raise HTTPException(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as err:
        raise HTTPException(400, f"the request body is not valid JSON: {err}") from None
    try:
        return model.model_validate(value)
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3]]
        more = f" (and {err.error_count() - 3} more)" if err.error_count() > 3 else ""
        raise HTTPException(422, "; ".join(problems)[:600] + more) from None


def json_body(model: type[BaseModel]):
    """A FastAPI dependency reading the request body as ``model`` with :func:`parse_body`, in place of
    FastAPI's own body parsing (which lets through integers SQLite cannot hold, answers 500 when
    its error echoes a non-finite number back, and 400 "error parsing the body" for non-UTF-8)."""

    async def read(request: Request) -> BaseModel:
        return parse_body(await request.body(), model)

    return read


class _BadNumber(ValueError):
    pass


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > 19 or not -MAX_SQLITE_INT - 1 <= int(text) <= MAX_SQLITE_INT:
        shown = text if len(text) <= 40 else f"{text[:40]}... ({digits} digits)"
        raise _BadNumber(f"the number {shown}, out of range (integers are 64-bit: at most {MAX_SQLITE_INT})")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:40]}, out of range (numbers must be finite)")
    return value


def _json_constant(text: str):
    raise _BadNumber(f"{text}, which is not a JSON number (numbers must be finite)")
