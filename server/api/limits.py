"""Request body size limit, enforced while the body streams in (never read whole into memory first)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


class BodySizeLimit:
    """413 with the JSON error body: at once if Content-Length is too large, else as soon as the count passes."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = f"request body is {declared} bytes, larger than the limit of {self.max_bytes} bytes"
            return await error_response(413, "payload_too_large", message)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the 413 handler.
                    raise HTTPException(
                        413, f"request body is larger than the limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)
