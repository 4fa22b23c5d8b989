"""The scheduler with a fake engine and a fake registry: batching, pins, failures, cancellation."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from server.errors import InvalidRequest, NotReady, PrefixNotFound
from server.request import FinishReason, Request, SamplingParams
from server.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class FakeRecord:
    task_id: str
    version: int


class FakePrefix:
    def __init__(self, n: int):
        self.num_virtual_tokens = n


class FakeRegistry:
    def __init__(self, tasks: dict[str, int]):
        self.tasks = dict(tasks)  # task_id -> version
        self.pins: dict[FakeRecord, int] = {}
        self.lock = threading.Lock()

    def acquire(self, task_id):
        with self.lock:
            if task_id not in self.tasks:
                raise PrefixNotFound(f"task {task_id!r} not found")
            record = FakeRecord(task_id, self.tasks[task_id])
            self.pins[record] = self.pins.get(record, 0) + 1
            return record, FakePrefix(4)

    def release(self, record):
        with self.lock:
            self.pins[record] -= 1

    def pinned(self) -> int:
        return sum(self.pins.values())


class FakeEngine:
    """Echoes each row's task and prompt; records batches and the pins held while it ran."""

    def __init__(self, registry: FakeRegistry | None = None, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.pins_seen: list[int] = []
        self.registry = registry
        self.delay = delay
        self.fail_next = False

    def validate(self, request):
        if request.prompt_token_ids == [666]:
            raise InvalidRequest("prompt 666 is not allowed")

    def generate(self, requests):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine exploded")
        self.batches.append([r.request_id for r in requests])
        if self.registry is not None:
            self.pins_seen.append(self.registry.pinned())
        if self.delay:
            threading.Event().wait(self.delay)
        for r in requests:
            r.output_token_ids = [r.prompt_token_ids[0], r.prefix_len]
            r.finish(FinishReason.LENGTH)
        return requests


def make(tasks=None, delay=0.0, max_batch_size=8, wait_ms=200.0):
    registry = FakeRegistry(tasks or {f"t{i}": 1 for i in range(20)})
    engine = FakeEngine(registry, delay)
    return engine, registry, Scheduler(engine, registry, SchedulerConfig(max_batch_size, wait_ms))


def req(task, prompt=1) -> Request:
    return Request([prompt], SamplingParams(max_new_tokens=2), task_id=task)


async def test_eight_tasks_run_as_one_batch_with_their_prefixes_pinned():
    engine, registry, sched = make()
    await sched.start()
    try:
        results = await asyncio.gather(*(sched.generate(req(f"t{i}", i)) for i in range(8)))
    finally:
        await sched.stop()
    assert len(engine.batches) == 1 and len(engine.batches[0]) == 8
    assert engine.pins_seen == [8]  # every row's prefix pinned while the batch ran
    assert registry.pinned() == 0  # and released after
    assert [r.output_token_ids for r in results] == [[i, 4] for i in range(8)]
    assert all(r.prefix_version == 1 and r.prefix is None for r in results)


async def test_overflow_goes_to_the_next_batch():
    engine, _, sched = make(max_batch_size=4, wait_ms=100.0)
    await sched.start()
    try:
        await asyncio.gather(*(sched.generate(req(f"t{i}")) for i in range(10)))
    finally:
        await sched.stop()
    assert [len(b) for b in engine.batches] == [4, 4, 2]


async def test_one_bad_request_fails_alone():
    engine, registry, sched = make()
    await sched.start()
    try:
        results = await asyncio.gather(
            sched.generate(req("t1")),
            sched.generate(req("missing")),
            sched.generate(req("t2", prompt=666)),
            sched.generate(Request([7], SamplingParams(max_new_tokens=2))),  # base model, no task
            return_exceptions=True,
        )
    finally:
        await sched.stop()
    assert isinstance(results[1], PrefixNotFound) and "missing" in str(results[1])
    assert isinstance(results[2], InvalidRequest)
    assert results[0].output_token_ids == [1, 4] and results[3].output_token_ids == [7, 0]
    assert len(engine.batches) == 1 and len(engine.batches[0]) == 2
    assert registry.pinned() == 0


async def test_engine_failure_fails_that_batch_and_serving_goes_on():
    engine, registry, sched = make(wait_ms=50.0)
    await sched.start()
    try:
        engine.fail_next = True
        with pytest.raises(RuntimeError, match="exploded"):
            await sched.generate(req("t1"))
        ok = await sched.generate(req("t2", 5))
    finally:
        await sched.stop()
    assert ok.output_token_ids == [5, 4] and registry.pinned() == 0


async def test_event_loop_stays_responsive_while_the_engine_runs():
    _engine, _, sched = make(delay=0.3, wait_ms=0.0)
    await sched.start()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        await sched.generate(req("t1"))
    finally:
        t.cancel()
        await sched.stop()
    assert ticks >= 5  # the loop ran while the (blocking) engine worked in its thread


async def test_cancelled_waiting_request_leaves_the_queue():
    engine, _, sched = make(delay=0.3, wait_ms=0.0, max_batch_size=1)
    await sched.start()
    try:
        first = asyncio.create_task(sched.generate(req("t1")))
        await asyncio.sleep(0.05)  # t1 is running now
        second = asyncio.create_task(sched.generate(req("t2")))
        await asyncio.sleep(0.01)
        assert len(sched.waiting) == 1
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert len(sched.waiting) == 0
        await first
    finally:
        await sched.stop()
    assert len(engine.batches) == 1


async def test_stop_fails_waiting_requests_and_refuses_new_ones():
    _engine, _, sched = make(delay=0.3, wait_ms=0.0, max_batch_size=1)
    await sched.start()
    running = asyncio.create_task(sched.generate(req("t1")))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(sched.generate(req("t2")))
    await asyncio.sleep(0.01)
    await sched.stop()
    results = await asyncio.gather(running, waiting, return_exceptions=True)
    assert isinstance(results[1], NotReady)
    with pytest.raises(NotReady):
        await sched.generate(req("t3"))
