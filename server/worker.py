"""The engine worker: the one thread that touches the engine.

The scheduler's loop (on the event loop) hands it each plan: the rows to abort and the requests to admit.
On its thread it aborts, validates and admits the joiners (with a prefill chunk), runs one decode step for
every running row, gives back the prefix pins of the requests that finished, and returns those requests.
Model jobs (e.g. encoding a prefix from text) run on the same thread, between steps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from server.errors import PrefixServerError
from server.request import FinishReason, Request
from server.waiting import Capacity

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLike(Capacity, Protocol):
    def validate(self, request: Request) -> None: ...
    def admit(self, requests: list[Request]) -> list[Request]: ...
    def step(self) -> list[Request]: ...
    def abort(self, requests: list[Request]) -> list[Request]: ...


def fail(request: Request, error: Exception) -> None:
    """The request ends with `error` (its waiter receives it)."""
    request.error = error
    request.finish(FinishReason.ERROR)


class EngineWorker:
    """Runs plans and model jobs on the engine's thread; counts the steps and the time they take.
    `release(request)` gives back a finished request's prefix pin."""

    def __init__(self, engine: EngineLike, release: Callable[[Request], None]) -> None:
        self.engine, self.release = engine, release
        self.num_steps = 0
        self.engine_seconds = 0.0  # time this thread spent in steps (prefills + decodes)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # rows per step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def run(self, admits: list[Request], aborts: list[Request]) -> list[Request]:
        """One step on the engine thread: abort, validate + admit joiners, one decode step. Returns the
        requests that finished (their pins released)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._step, admits, aborts)

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run a model job on the engine thread, between steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def shutdown(self) -> None:
        """Let the jobs handed in finish, then end the thread."""
        self._executor.shutdown(wait=True)

    def fail_all(self, admits: list[Request], error: Exception) -> list[Request]:
        """After a step raised (an engine bug): the joiners and every row the engine held fail, their pins
        released. Runs on the event loop (the engine thread is idle then)."""
        doomed = {*admits, *self.engine.running}
        self.engine.abort(list(self.engine.running))
        for request in doomed:
            fail(request, error)
            self.release(request)
        return list(doomed)

    def _step(self, admits: list[Request], aborts: list[Request]) -> list[Request]:
        start = time.perf_counter()
        try:
            return self._run_step(admits, aborts)
        finally:
            self.engine_seconds += time.perf_counter() - start

    def _run_step(self, admits: list[Request], aborts: list[Request]) -> list[Request]:
        finished = self.engine.abort(aborts)
        runnable = []
        gone = set(aborts)
        for request in admits:
            if request in gone:  # its client left between planning and now: never admitted
                request.finish(FinishReason.ABORT)
                finished.append(request)
                continue
            try:  # its prefix is pinned already (server/prefetch.py): no store read on this thread
                self.engine.validate(request)
                runnable.append(request)
            except PrefixServerError as e:  # fails this request only, never the batch
                fail(request, e)
                finished.append(request)
            except Exception as e:  # a validation bug: still this request only
                log.exception("validating request %s failed", request.request_id)
                fail(
                    request,
                    PrefixServerError(
                        f"the request could not be admitted ({type(e).__name__}); see the server log"
                    ),
                )
                finished.append(request)
        finished += self.engine.admit(runnable)
        if self.engine.running:
            self.batch_sizes.append(len(self.engine.running))
            self.num_steps += 1
            finished += self.engine.step()
        for request in finished:
            self.release(request)
        return finished
