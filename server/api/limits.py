"""Request body limits, enforced while the body streams in: its size (never read whole into memory
first) and the time it takes to arrive (a client sending a byte a second cannot hold a request open);
and the size of one uploaded part."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response
from server.errors import PayloadTooLarge


class BodySizeLimit:
    """413 with the JSON error body: at once if Content-Length is too large, else as soon as the count passes.
    `path_limits`: other limits for the paths that take other uploads (path -> bytes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            message = f"request body is {declared} bytes, larger than the limit of {limit} bytes"
            return await error_response(413, "payload_too_large", message)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing to the 413 handler.
                    raise HTTPException(413, f"request body is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def read_limited(upload: UploadFile | str, limit: int, what: str) -> bytes:
    """A form part's bytes (a file part is read from its spooled file), PayloadTooLarge (413) beyond
    `limit`: never more than limit + 1 bytes are read."""
    data = upload.encode() if isinstance(upload, str) else await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
    return data


class BodyTimeout:
    """408 with the JSON error body (and the connection closed) when the whole body has not arrived
    within `timeout_s` of the request head; once it has, `receive` waits unbounded (for a disconnect)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.timeout_s:
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        body_done = False
        timed_out = response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                timed_out = True
                # An HTTPException passes through FastAPI's body parsing; its answer is replaced below.
                raise HTTPException(408, "request body timed out") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out and not response_started:
                return  # the app's answer to the timeout; ours goes instead
            response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out or response_started:
                raise
        if timed_out and not response_started:
            message = f"the request body did not arrive within {self.timeout_s:g} s"
            headers = {"Connection": "close"}  # the rest of the body may still be coming: do not parse it
            await error_response(408, "request_timeout", message, headers)(scope, receive, send)
