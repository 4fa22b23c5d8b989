"""Prefetch: a request's prefix is pinned before the request queues for the batch, off the engine thread.

A cold prefix (a store read, its sha256, parsing, dtype and device) once loaded on the engine thread
when its request joined the batch, and every running row waited for it. Now `Scheduler.submit` hands a
request with a task here: a prefix the cache holds is pinned at once on the event loop; any other loads
on a thread of its own that ends with the load (server/threads.py: never a long-lived pool), and only
then does the request join its fairness queue. The scheduler plans only requests whose prefix is in.
One load per task version runs at a time: a burst of requests for a cold task waits for the first
one's load (one store read, one parse) and then finds the prefix cached.

All bookkeeping runs on the event loop; the load thread only calls `registry.acquire`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from server.errors import PrefixServerError
from server.request import Request
from server.threads import in_own_thread

log = logging.getLogger(__name__)


class PrefixLoader:
    """Pins requests' prefixes; `on_ready(request)` when one is in, `on_failed(request, error)` if not."""

    def __init__(
        self,
        registry: Any,  # scheduler.RegistryLike
        on_ready: Callable[[Request], None],
        on_failed: Callable[[Request, Exception], None],
    ) -> None:
        self.registry = registry
        self.on_ready, self.on_failed = on_ready, on_failed
        self.loading: set[Request] = set()  # their loads run; aborted ones leave this set at once
        self._tasks: set[asyncio.Task] = set()  # the loads in flight (asyncio keeps only weak references)
        # (task_id, version) -> done when the load running for it ends
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}

    @property
    def num_loading(self) -> int:
        return len(self.loading)

    def start(self, request: Request) -> bool:
        """Pin the request's prefix. True: pinned now (a cache hit); False: loading, and `on_ready` or
        `on_failed` follows. PrefixNotFound (and the like) from the registry are raised here."""
        hit = self.registry.acquire_cached(request.task_id)
        if hit is not None:
            attach(request, *hit)
            return True
        self.loading.add(request)
        task = asyncio.get_running_loop().create_task(self._load(request), name=f"load {request.task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False

    def cancel(self, request: Request) -> bool:
        """Forget a loading request (aborted, or failed by a shutdown); False if it was not loading.
        Its load is not interrupted (a thread cannot be): the pin it takes is released when it ends."""
        if request not in self.loading:
            return False
        self.loading.discard(request)
        return True

    def cancel_all(self) -> list[Request]:
        """Forget every loading request (see `cancel`); returns them."""
        requests = list(self.loading)
        self.loading.clear()
        return requests

    async def _load(self, request: Request) -> None:
        task_id = request.task_id
        while True:
            if request not in self.loading:  # aborted, or failed by a shutdown: nothing to load
                return
            try:  # the latest version (an index lookup, as submit's) and, once a load ends, a cache hit
                key = (task_id, self.registry.get(task_id).version)
                pending = self._inflight.get(key)
                hit = None if pending is not None else self.registry.acquire_cached(task_id)
            except Exception as e:  # e.g. the task was deleted meanwhile
                self._failed(request, e)
                return
            if hit is not None:
                self._ready(request, *hit)
                return
            if pending is None:
                break
            await asyncio.shield(pending)  # shielded: this request's end must not cancel the others' wait
        done = self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            record, prefix = await in_own_thread(self.registry.acquire, task_id)
        except Exception as e:
            self._failed(request, e)
            return
        finally:
            del self._inflight[key]
            done.set_result(None)
        self._ready(request, record, prefix)

    def _ready(self, request: Request, record: Any, prefix: Any) -> None:
        if not self.cancel(request):  # aborted or failed while it loaded: nobody will run it
            self.registry.release(record)
            return
        attach(request, record, prefix)
        self.on_ready(request)

    def _failed(self, request: Request, error: Exception) -> None:
        if self.cancel(request):  # else it is gone already, and nothing was pinned
            self.on_failed(request, load_error(request, error))


def attach(request: Request, record: Any, prefix: Any) -> None:
    """The pinned prefix onto its request; `prefix_key` names its content for the engine's page pool."""
    request.prefix_record, request.prefix, request.prefix_version = record, prefix, record.version
    request.prefix_key = (record.task_id, record.version, getattr(record, "sha256", None))


def load_error(request: Request, error: Exception) -> PrefixServerError:
    """What the client of a failed load gets: a domain error as it is, anything else (e.g. an OSError of
    an unreadable stored file) logged and named without its details."""
    if isinstance(error, PrefixServerError):
        return error
    log.error("loading the prefix of task %r failed", request.task_id, exc_info=error)
    return PrefixServerError(
        f"the prefix of task {request.task_id!r} could not be loaded ({type(error).__name__}); "
        "see the server log"
    )
