"""The serve app's body limit (``BodyLimit``), driven as ASGI messages: Starlette's TestClient
reads a streamed body whole and sends it as one message, so it cannot split a body.
Fast enough for ``make mutate``."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'chattune[serve]'")
from chattune.serve.app import BodyLimit  # noqa: E402


def limited(messages, limit=8, headers=()):
    """Drive BodyLimit with these receive() messages; what the app read, what was sent, receives made."""
    seen, sent, reads = {}, [], []

    async def app(scope, receive, send):
        seen["message"] = await receive()

    async def receive():
        reads.append(1)
        return messages[len(reads) - 1]

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": list(headers), "path": "/v1/chat/completions"}
    asyncio.run(BodyLimit(app, limit)(scope, receive, send))
    status = sent[0]["status"] if sent else None
    if "message" in seen:  # the app is handed the whole body as one final message
        assert seen["message"] == {"type": "http.request", "body": seen["message"]["body"], "more_body": False}
    return seen.get("message", {}).get("body"), status, len(reads)


def test_the_body_limit_joins_a_chunked_body_and_replays_it_whole():
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "more_body": True},  # ASGI: "body" may be left out, meaning b""
              {"type": "http.request", "body": b"cd"}]  # and "more_body" left out means the last
    assert limited(chunks) == (b"abcd", None, 3)
    assert limited([{"type": "http.request", "body": b"12345678"}]) == (b"12345678", None, 1)  # exactly the limit
    over = [{"type": "http.request", "body": b"12345", "more_body": True}, {"type": "http.request", "body": b"6789"}]
    assert limited(over) == (None, 413, 2)
    # a client gone before its body arrived: the app never runs (no engine work for nobody)
    assert limited([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]) == (None, None, 2)
    # Content-Length over the limit is refused before anything is read
    assert limited([], headers=[(b"content-length", b"9")]) == (None, 413, 0)
    assert limited([{"type": "http.request", "body": b"ab"}], headers=[(b"content-length", b"2")]) == (b"ab", None, 1)
