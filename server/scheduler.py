"""The scheduler: takes requests in, plans each step, and hands the results back to their waiters.

Plain Python (no torch). A request's prefix is pinned before it queues (server/prefetch.py: a cold load
never runs on the engine thread) and released when it finishes. Each iteration of the loop *plans*
(server/waiting.py: which waiting requests join the running batch now, round-robin across tasks, within
the free rows, the free K/V pages and the token budget), the engine *runs* the plan on its own thread
(server/worker.py: prefill of the joiners, then one decode step for every running row), and a
*postprocess* step makes their text (server/output.py: incremental detokenizing and stop strings, here on
the event loop, not on the engine thread) and hands tokens and finished requests back to their waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from server.config import Settings
from server.errors import InvalidRequest, NotReady, Overloaded, RequestTimeout
from server.prefetch import PrefixLoader
from server.request import FinishReason, Request
from server.waiting import WaitingQueues
from server.worker import EngineLike, EngineWorker, fail

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutputLike(Protocol):
    def update(self, request: Request) -> bool: ...
    def done(self, request: Request) -> None: ...


class RegistryLike(Protocol):
    def get(self, task_id: str) -> Any: ...
    def acquire(self, task_id: str) -> tuple[Any, Any]: ...
    def acquire_cached(self, task_id: str) -> tuple[Any, Any] | None: ...
    def release(self, record: Any) -> None: ...


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(Settings) if f.name == name)


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's part of the Settings (`from_settings`); the defaults are the server's."""

    max_batch_wait_ms: float = _default("max_batch_wait_ms")  # an idle engine waits for a first batch
    max_batch_size: int = _default("max_batch_size")  # the row limit (= the engine's)
    max_batch_tokens: int = _default("max_batch_tokens")  # sum of running rows' prefix + prompt + new
    max_queue: int = _default("max_queue")  # waiting requests beyond this get 429
    continuous: bool = True  # False: static batches (a batch runs to its end before the next starts)
    request_timeout_s: float = _default("request_timeout_s")  # 0 = none

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulerConfig:
        return cls(
            max_batch_wait_ms=settings.max_batch_wait_ms,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.max_queue,
            continuous=settings.batching == "continuous",
            request_timeout_s=settings.request_timeout_s,
        )


@dataclass
class Event:
    """What a waiter receives: token deltas (streaming), then one final event."""

    kind: str  # "token" | "done" | "error"
    token_ids: list[int] | None = None
    text: str = ""
    error: Exception | None = None


class Scheduler:
    """submit / events / abort on the event loop; one loop task plans and runs the engine's steps."""

    def __init__(
        self,
        engine: EngineLike,
        registry: RegistryLike | None,
        config: SchedulerConfig,
        output: OutputLike | None = None,
    ):
        """`output`: makes the requests' text from their tokens (server/output.py's OutputProcessor);
        None: the engine does (test fakes)."""
        self.engine, self.registry, self.config, self.output = engine, registry, config, output
        # Ready requests (prefix pinned) per tenant (or task), in the order they became ready.
        self.waiting = WaitingQueues(on_failed=self._fail_ready)
        self._aborts: set[Request] = set()
        self.loader = PrefixLoader(registry, on_ready=self._enqueue, on_failed=self._fail_load)
        self.running_tokens = 0
        self.worker = EngineWorker(engine, release=self._release)
        self.batch_sizes = self.worker.batch_sizes  # rows per decode step (the same deque)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._draining = False

    # ---- lifecycle ----
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def num_waiting(self) -> int:
        """Accepted requests not yet planned: ready ones and those whose prefix still loads."""
        return self.num_ready + self.loader.num_loading

    @property
    def num_ready(self) -> int:
        """Waiting requests plan() may admit (their prefix is pinned)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    @property
    def num_steps(self) -> int:
        return self.worker.num_steps

    @property
    def engine_seconds(self) -> float:
        """Time the engine worker spent in steps (prefills + decodes)."""
        return self.worker.engine_seconds

    async def drain(self, timeout: float) -> None:
        """Stop admitting new requests; finish everything accepted, up to `timeout` seconds; abort the rest."""
        self._accepting = False
        self._wake()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("drain timed out after %.1f s: aborting %d requests", timeout, self.num_running)
                self._draining = True  # the loop aborts what is left and exits
                self._wake()
                await asyncio.gather(self._task, return_exceptions=True)
        self.worker.shutdown()

    async def stop(self) -> None:
        """Stop now: fail what waits, abort what runs."""
        self._accepting = False
        self._draining = True
        await self.drain(timeout=0.0 if self._task is None else 60.0)

    # ---- the request path ----
    def submit(self, request: Request) -> None:
        """Queue a request (404 for an unknown task, 429 if the queue is full); the caller then reads
        `events(request)`. A request whose prefix is not cached queues once it has loaded."""
        if not self._accepting or self._wakeup is None:
            raise NotReady("server is not accepting requests (starting or shutting down)")
        if not self.loop_running:
            raise NotReady("the scheduler loop stopped; see the server log")
        if self.num_waiting >= self.config.max_queue:
            raise Overloaded(f"queue is full ({self.config.max_queue} waiting requests); retry later")
        prefix_len = 0
        if request.task_id is not None and self.registry is not None:
            prefix_len = self.registry.get(request.task_id).num_virtual_tokens  # 404 before queueing
        request.budget_tokens = prefix_len + request.num_prompt_tokens + request.sampling.max_new_tokens
        if request.budget_tokens > self.config.max_batch_tokens:
            raise InvalidRequest(
                f"request needs {request.budget_tokens} tokens (prefix + prompt + max_new_tokens), "
                f"max-batch-tokens is {self.config.max_batch_tokens}"
            )
        request.sink = asyncio.Queue()
        request.arrival_time = time.monotonic()
        if request.task_id is not None and self.registry is not None and not self.loader.start(request):
            return  # loading: _enqueue (or _fail_load) follows
        self._enqueue(request)

    async def events(self, request: Request) -> AsyncIterator[Event]:
        """The request's events until its final one; abort it if the consumer goes away or times out."""
        timeout = self.config.request_timeout_s or None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(request.sink.get(), remaining)
                except TimeoutError:
                    raise RequestTimeout(
                        f"request took longer than the {timeout:g} s request timeout"
                    ) from None
                yield event
                if event.kind != "token":
                    return
        finally:
            if not request.finished:
                self.abort(request)

    def abort(self, request: Request) -> None:
        """Drop a request: loading or queued now, or (running, or planned and on its way into the batch) at
        the engine worker's next step. Safe to call more than once."""
        if request.finished:
            return
        if self.loader.cancel(request):  # its pin is released when its load ends
            request.finish(FinishReason.ABORT)
            self._wake()  # a draining loop may have been waiting for this load only
            return
        if self.waiting.remove(request):
            request.finish(FinishReason.ABORT)
            self._release(request)  # a ready request holds its prefix's pin
        else:
            self._aborts.add(request)
            self._wake()

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run a model job (e.g. encoding a prefix from text) on the engine worker, between steps."""
        return await self.worker.run_exclusive(fn)

    def plan(self) -> list[Request]:
        """Which ready requests join the running batch now (`WaitingQueues.plan`: round-robin across
        tasks, within the free rows, the free K/V pages and the token budget). Static mode admits only
        into an empty batch."""
        if not self.config.continuous and self.engine.running:
            return []
        admitted = self.waiting.plan(self.engine, self.config.max_batch_tokens - self.running_tokens)
        self.running_tokens += sum(r.budget_tokens for r in admitted)
        return admitted

    # ---- internals ----
    def _enqueue(self, request: Request) -> None:
        """A ready request joins the end of its fairness queue."""
        self.waiting.add(request)
        self._wake()

    def _fail_ready(self, request: Request, error: Exception) -> None:
        """A ready request out of its queue that will never run fails and gives back its prefix's pin."""
        fail(request, error)
        self._release(request)
        self._send_final(request)

    def _fail_load(self, request: Request, error: Exception) -> None:
        """A prefix that did not load fails its request only (it was never planned: no tokens to return)."""
        fail(request, error)
        self._send_final(request)
        self._wake()  # a draining loop may have been waiting for this load only

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def loop_running(self) -> bool:
        """Whether the loop that drives the engine is alive (/ready says 503 otherwise)."""
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        while True:
            try:
                if not await self._iteration():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug outside the engine step: logged, and serving goes on
                log.exception("scheduler iteration failed; the loop goes on")
                await asyncio.sleep(0.01)  # never a hot loop on a repeating error

    async def _iteration(self) -> bool:
        """One turn of the loop: wait for work, plan, run the step, hand out results. False: loop ends."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        if self._draining:
            self._fail_waiting(NotReady("server is shutting down"))
            self._aborts.update(self.engine.running)
        if not self.num_ready and not self.engine.running and not self._aborts:
            if not self._accepting and not self.loader.num_loading:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
            return True
        if not self.engine.running:
            # An idle engine waits a moment so that requests arriving together share the first prefill.
            deadline = loop.time() + self.config.max_batch_wait_ms / 1000
            while self.num_ready < self.config.max_batch_size and self._accepting and loop.time() < deadline:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
        admits, aborts = self.plan(), list(self._aborts)
        self._aborts.clear()
        try:
            finished = await self.worker.run(admits, aborts)
        except Exception as e:  # an engine bug: fail every row it held, keep serving
            log.exception("engine step failed")
            finished = self.worker.fail_all(admits, e)
        self._postprocess(finished)
        return True

    def _release(self, request: Request) -> None:
        request.prefix = None
        if request.prefix_record is not None and self.registry is not None:
            self.registry.release(request.prefix_record)
            request.prefix_record = None

    def _fail_waiting(self, error: Exception) -> None:
        for request in self.loader.cancel_all():  # pins released when their loads end
            fail(request, error)
            self._send_final(request)
        for request in self.waiting.take_all():
            self._fail_ready(request, error)

    def _postprocess(self, finished: list[Request]) -> None:
        now = time.monotonic()
        for request in [*self.engine.running, *finished]:
            if self.output is not None and self.output.update(request):
                self._aborts.add(request)  # a stop string matched: its row leaves before the next step
            if request.first_token_time is None and request.output_token_ids:
                request.first_token_time = now
            if request.stream and request.error is None:
                tokens, text = request.take_delta()
                if tokens or text:
                    request.sink.put_nowait(Event("token", tokens, text))
        for request in finished:
            self.running_tokens -= request.budget_tokens  # every finished request was admitted by plan()
            if self.output is not None:
                self.output.done(request)
            self._send_final(request)

    def _send_final(self, request: Request) -> None:
        if request.error is not None:
            request.sink.put_nowait(Event("error", error=request.error))
        elif request.finish_reason is FinishReason.ABORT and self._draining:
            request.sink.put_nowait(
                Event("error", error=NotReady("server shut down before the request finished"))
            )
        else:
            request.sink.put_nowait(Event("done"))
