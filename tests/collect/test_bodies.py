"""Request bodies of the labelling app: strict UTF-8 JSON with numbers SQLite can hold, one-line refusals."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from preftune.collect.bodies import _TooLarge, parse_body, read_body
from preftune.collect.server import LabelIn, Who


def refused(body: bytes, model=LabelIn) -> tuple[int, str]:
    with pytest.raises(HTTPException) as err:
        parse_body(body, model)
    return err.value.status_code, err.value.detail


def test_parse_body_accepts_what_the_page_sends():
    body = b'{"annotator": "ann", "task_id": 3, "display_order": [1, 0], "choice": "left", "reason": "caf\xc3\xa9"}'
    label = parse_body(body, LabelIn)
    assert (label.task_id, label.display_order, label.reason) == (3, [1, 0], "caf\u00e9")
    assert parse_body(b'{"annotator": "ann"}', Who).annotator == "ann"


@pytest.mark.parametrize("body, status, words", [
    (b'{"annotator": "caf\xe9"}', 400, "must be UTF-8 JSON (byte 19 is not UTF-8)"),
    (b'{"annotator": "ann", "n": 1e400}', 400, "the number 1e400, out of range"),
    (b'{"annotator": "ann", "n": -Infinity}', 400, "-Infinity, which is not a JSON number"),
    (b'{"annotator": "ann", "n": -9223372036854775809}', 400, "the number -9223372036854775809, out of range"),
    (b'{"annotator": "ann"', 400, "not valid JSON"),
    (b"[" * 100_000, 400, "not valid JSON"),
    (b'{"annotator": "ann", "n": 1}', 422, "n: Extra inputs are not permitted"),
    (b'{"annotator": 7}', 422, "annotator: Input should be a valid string"),
])
def test_parse_body_refusals_are_one_line(body, status, words):
    code, detail = refused(body, Who)
    assert code == status and words in detail and "\n" not in detail and len(detail) < 700


def test_a_long_number_is_shown_cut():
    code, detail = refused(b'{"annotator": "ann", "task_id": ' + b"7" * 50_000 + b"}")
    assert code == 400 and "(50000 digits)" in detail and len(detail) < 200


def test_read_body_joins_chunks_up_to_the_limit():
    def receiver(*chunks: bytes):
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        return receive

    assert asyncio.run(read_body(receiver(b"ab", b"", b"cd"), limit=4)) == b"abcd"
    with pytest.raises(_TooLarge):
        asyncio.run(read_body(receiver(b"ab", b"cde"), limit=4))
