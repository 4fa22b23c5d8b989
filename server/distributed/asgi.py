"""Run one HTTP request through an ASGI app in this process, streaming its response back.

A replica serves the very app `prefix-server serve` serves (`create_app`): the ingress forwards the
request as plain values (method, path, query, headers, body) and relays what this yields, so endpoints,
errors, auth and streaming stay identical by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


@dataclass
class ResponseHead:
    """The status, the headers, and the first part of the body (all of it unless `more_body`)."""

    status: int
    headers: Headers
    body: bytes = b""
    more_body: bool = False


async def call_asgi(
    app, method: str, path: str, query_string: bytes, headers: Headers, body: bytes
) -> AsyncIterator[ResponseHead | bytes]:
    """Yield the response's head, then (for a streamed body) each further chunk as bytes.

    Closing the iterator early is a client disconnect: the app sees `http.disconnect` and its task is
    cancelled, so a generate request is aborted as it is on the single server.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": urllib.parse.quote(path).encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    request_sent = False

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    head: ResponseHead | None = None
    head_sent = complete = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                head = ResponseHead(message["status"], [tuple(h) for h in message.get("headers", [])])
            elif message["type"] == "http.response.body" and head is not None:
                chunk, more = message.get("body", b""), message.get("more_body", False)
                complete = not more
                if not head_sent:  # the head carries the first chunk (for most replies, the whole body)
                    head.body, head.more_body, head_sent = chunk, more, True
                    yield head
                elif chunk:
                    yield chunk
                if complete:
                    return
        await task  # the app ended without a whole response: raise its error
        raise RuntimeError("the app ended without sending a whole response")
    finally:
        disconnected.set()
        if not complete:
            task.cancel()
        # After a whole response the app only finishes up; errors it raises there it has logged itself.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
