"""Non-streaming replies end when their client leaves: the request is aborted, its row freed at the next
decode step (a stream notices on its own, when a send fails; a plain reply would otherwise run to its
end for nobody). vLLM's `with_cancellation` does the same."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from server.errors import ClientDisconnected

T = TypeVar("T")


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected once the client has gone (`work` is then cancelled, so its
    `finally` blocks abort what it started)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected("the client closed the connection before the reply was ready")
    return task.result()
