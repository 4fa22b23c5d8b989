"""URL-encoded form bodies read as UTF-8, as HTML specifies. Starlette decodes a raw (unescaped) byte of
such a body as Latin-1 but a %XX escape as UTF-8, so `task_id=café` sent as raw UTF-8 became 'cafÃ©' in
the reply's error message. Escaping every non-ASCII byte on the way in makes all of it UTF-8."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ESCAPED = {byte: b"%%%02X" % byte for byte in range(0x80, 0x100)}


def escape_non_ascii(chunk: bytes) -> bytes:
    """Each byte >= 0x80 as its %XX escape (byte by byte, so a body may be cut anywhere)."""
    if chunk.isascii():
        return chunk
    return b"".join(_ESCAPED.get(byte, bytes((byte,))) for byte in chunk)


class Utf8Forms:
    """Rewrites the body of application/x-www-form-urlencoded requests as it streams in."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = Headers(scope=scope).get("content-type", "") if scope["type"] == "http" else ""
        if not kind.lower().startswith("application/x-www-form-urlencoded"):
            return await self.app(scope, receive, send)

        async def escaped_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                message = {**message, "body": escape_non_ascii(message.get("body", b""))}
            return message

        await self.app(scope, escaped_receive, send)
