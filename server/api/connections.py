"""Connection limits below the ASGI app, where uvicorn has none: a deadline for each request head, and
a cap on open connections that sheds the oldest connection still waiting for its head.

uvicorn closes a keep-alive connection only after it has answered on it (`timeout_keep_alive`), and
its `limit_concurrency` counts idle sockets too, answering 503 to real clients while they sit there.
So a socket that connects and never completes a request line (or sends a header byte a second) would
hold a file descriptor for ever. Here every connection must deliver a complete request head within
`header_timeout_s` of opening or of its previous reply; past `max_connections`, a new connection
closes the oldest one that is still waiting for its head (a real client sends its head within
milliseconds, so the oldest waiting one is the likeliest attacker), or is refused with 503 if every
open connection is running a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON error body, for a connection that has no request to answer."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


def guarded_protocol(
    header_timeout_s: float, max_connections: int, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class `base` (httptools if installed, else h11) with the head deadline and the
    connection cap; pass it as `uvicorn.Config(http=...)`. One class per server: it keeps its connections."""
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if max_connections + 64 > open_files:  # model files, the store, logs: a few dozen more descriptors
        logging.getLogger(__name__).warning(
            "max_connections %d is near the open-file limit (ulimit -n) %d: past it new connections "
            "are not accepted at all; raise the limit or lower --max-connections",
            max_connections,
            open_files,
        )
    open_connections: dict[asyncio.Protocol, None] = {}  # insertion order: oldest first

    class GuardedProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            open_connections[self] = None
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            if len(open_connections) > max_connections and not self._shed_one():
                message = f"the server has {max_connections} connections open, all running requests"
                transport.write(_raw_response(503, "Service Unavailable", "overloaded", message))
                transport.close()
                return
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            open_connections.pop(self, None)
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._head_bytes += len(data)
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request's head, on this keep-alive connection

        def waiting_for_head(self) -> bool:
            """No request of this connection is being served (none yet, or the last one answered)."""
            cycle = getattr(self, "cycle", None)
            in_progress = cycle is not None and not cycle.response_complete
            return not in_progress and not getattr(self, "pipeline", None)

        def _shed_one(self) -> bool:
            for conn in open_connections:
                if conn is not self and conn.waiting_for_head() and not conn.transport.is_closing():
                    conn.transport.close()
                    return True
            return False

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_bytes = 0
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_deadline)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self.waiting_for_head():
                return
            if self._head_bytes:  # a partial head: say why; an idle socket is just closed
                message = f"the request head did not arrive within {header_timeout_s:g} s"
                self.transport.write(_raw_response(408, "Request Timeout", "request_timeout", message))
            self.transport.close()

    return GuardedProtocol
