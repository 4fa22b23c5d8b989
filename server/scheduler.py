"""The scheduler: a waiting queue, batch formation, and the worker that runs the engine.

Plain Python (no torch): it plans which requests run together; the engine runs the plan in a worker
thread so the event loop stays responsive; postprocess hands each finished request back to its waiter.
Each request's prefix is acquired from the registry when its batch starts and released when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from server.errors import NotReady, PrefixServerError
from server.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLike(Protocol):
    def validate(self, request: Request) -> None: ...
    def generate(self, requests: list[Request]) -> list[Request]: ...


class RegistryLike(Protocol):
    def acquire(self, task_id: str) -> tuple[Any, Any]: ...
    def release(self, record: Any) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0


class Scheduler:
    """Groups waiting requests of any tasks into one batch and runs it on a single engine worker."""

    def __init__(self, engine: EngineLike, registry: RegistryLike | None, config: SchedulerConfig):
        self.engine = engine
        self.registry = registry
        self.config = config
        self.waiting: collections.deque[Request] = collections.deque()
        self.num_running = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # recent, for tests/metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False

    # ---- lifecycle ----
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Stop admitting, fail what is still waiting, let the running batch finish, then stop."""
        self._accepting = False
        for request in self.waiting:
            self._fail(request, NotReady("server is shutting down"))
            self._postprocess(request)
        self.waiting.clear()
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- the request path ----
    async def generate(self, request: Request) -> Request:
        """Queue a request and wait until it has finished; raises its error if it failed."""
        if not self._accepting or self._wakeup is None:
            raise NotReady("server is not accepting requests")
        request.sink = asyncio.get_running_loop().create_future()
        self.waiting.append(request)
        self._wakeup.set()
        try:
            return await request.sink
        except asyncio.CancelledError:
            if request.status is RequestStatus.WAITING and request in self.waiting:
                self.waiting.remove(request)  # the client went away before its batch started
            raise

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run a model job (e.g. encoding a prefix from text) on the engine worker, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def plan(self) -> list[Request]:
        """The next batch: the oldest waiting requests, up to max_batch_size."""
        batch = []
        while self.waiting and len(batch) < self.config.max_batch_size:
            batch.append(self.waiting.popleft())
        return batch

    # ---- internals ----
    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while self._accepting:
            if not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = loop.time() + self.config.max_batch_wait_ms / 1000
            while len(self.waiting) < self.config.max_batch_size and loop.time() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
            batch = self.plan()
            if not batch:
                continue
            self.num_running = len(batch)
            self.batch_sizes.append(len(batch))
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # an engine bug: fail this batch, keep serving
                log.exception("batch of %d failed", len(batch))
                for request in batch:
                    if not request.finished:
                        self._fail(request, e)
            finally:
                self.num_running = 0
            for request in batch:
                self._postprocess(request)

    def _run_batch(self, batch: list[Request]) -> None:
        """Worker thread: acquire prefixes, validate, run the engine, release prefixes."""
        records = []
        runnable = []
        try:
            for request in batch:
                try:
                    if request.task_id is not None and self.registry is not None:
                        record, prefix = self.registry.acquire(request.task_id)
                        records.append(record)
                        request.prefix, request.prefix_version = prefix, record.version
                    self.engine.validate(request)
                    runnable.append(request)
                except PrefixServerError as e:  # fails this request only, never the batch
                    self._fail(request, e)
            started = time.perf_counter()
            if runnable:
                self.engine.generate(runnable)
            log.debug("batch of %d ran in %.3f s", len(runnable), time.perf_counter() - started)
        finally:
            for request in batch:
                request.prefix = None  # drop the tensor reference with the pin
            for record in records:
                self.registry.release(record)

    def _fail(self, request: Request, error: Exception) -> None:
        request.error = error
        request.finish(FinishReason.ERROR)

    def _postprocess(self, request: Request) -> None:
        future = request.sink
        if future is None or future.done():
            return
        if request.error is not None:
            future.set_exception(request.error)
        else:
            future.set_result(request)
