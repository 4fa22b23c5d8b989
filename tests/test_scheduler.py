"""The scheduler with a fake engine and a fake registry: admission, fairness, budgets, pages, pins,
prefix loading off the engine thread, streaming, cancellation, drain. No model: the scheduler is plain
Python."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from server.errors import InvalidRequest, NotReady, Overloaded, PrefixNotFound, PrefixServerError
from server.request import FinishReason, Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class FakeRecord:
    task_id: str
    version: int
    num_virtual_tokens: int = 4


class FakePrefix:
    num_virtual_tokens = 4


class FakeRegistry:
    """Tasks and their latest versions. The versions of the tasks given are cached; any other (a task or
    version added later) is cold: `acquire` loads it, waiting on `gate` first if the task is in `gated`
    (a slow store), raising `fail[task_id]` if set; `acquire_cached` pins cached versions only."""

    def __init__(self, tasks):
        self.tasks = dict(tasks)  # task_id -> version
        self.cached = {FakeRecord(t, v) for t, v in self.tasks.items()}
        self.pins: dict[FakeRecord, int] = {}
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gated: set[str] = set()
        self.fail: dict[str, Exception] = {}
        self.num_loads_started = 0
        self.num_loads_ended = 0  # counted after the load's pin, if it took one

    def get(self, task_id):
        if task_id not in self.tasks:
            raise PrefixNotFound(f"task {task_id!r} not found")
        return FakeRecord(task_id, self.tasks[task_id])

    def acquire(self, task_id):
        record = self.get(task_id)
        if record in self.cached:
            return self._pin(record)
        with self.lock:
            self.num_loads_started += 1
        try:
            if task_id in self.gated:
                assert self.gate.wait(30), "the test never opened the gate"
            if task_id in self.fail:
                raise self.fail[task_id]
            self.cached.add(record)
            return self._pin(record)
        finally:
            with self.lock:
                self.num_loads_ended += 1

    def acquire_cached(self, task_id):
        record = self.get(task_id)
        return self._pin(record) if record in self.cached else None

    def _pin(self, record):
        with self.lock:
            self.pins[record] = self.pins.get(record, 0) + 1
            return record, FakePrefix()

    def release(self, record):
        with self.lock:
            self.pins[record] -= 1
            assert self.pins[record] >= 0

    def pinned(self) -> int:
        return sum(self.pins.values())


class FakeEngine:
    """Each row emits its step count as a token until max_new_tokens; records admissions and pins.

    Pages: a row holds one page per token of its prompt + max_new_tokens from its admission, and its
    prefix one page per virtual token, once for all the rows of one prefix_key."""

    def __init__(self, registry=None, slots=16, delay=0.0, pages=1 << 30):
        self.running: list[Request] = []
        self.slots, self.delay, self.registry, self.pages = slots, delay, registry, pages
        self.admissions: list[list[str]] = []
        self.pins_seen: list[int] = []
        self.aborted: list[Request] = []
        self.max_pages_used = 0
        self.fail_next = False

    @property
    def num_free_rows(self):
        return self.slots - len(self.running)

    @property
    def num_available_pages(self):
        prefixes = {r.prefix_key: r.prefix_len for r in self.running if r.prefix is not None}
        return self.pages - sum(map(own_pages, self.running)) - sum(prefixes.values())

    def pages_needed(self, request, counted):
        assert request.task_id is None or request.prefix is not None, "asked before its prefix loaded"
        pages = own_pages(request)
        in_use = {r.prefix_key for r in self.running}
        if request.prefix is not None and request.prefix_key not in in_use | counted:
            counted.add(request.prefix_key)
            pages += request.prefix_len
        return pages

    def validate(self, request):
        if request.prompt_token_ids == (666,):
            raise InvalidRequest("prompt 666 is not allowed")

    def admit(self, requests):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine exploded")
        assert len(requests) <= self.num_free_rows
        counted = set()
        assert sum(self.pages_needed(r, counted) for r in requests) <= self.num_available_pages
        if requests:
            self.admissions.append([r.task_id for r in requests])
        for r in requests:
            r.status = RequestStatus.RUNNING
        self.running += list(requests)
        self.max_pages_used = max(self.max_pages_used, self.pages - self.num_available_pages)
        return []

    def step(self):
        if self.registry is not None:
            self.pins_seen.append(self.registry.pinned())
        if self.delay:
            threading.Event().wait(self.delay)
        for r in self.running:
            r.output_token_ids.append(len(r.output_token_ids))
            r.text += "x"
            if len(r.output_token_ids) >= r.sampling.max_new_tokens:
                r.finish(FinishReason.LENGTH)
        done = [r for r in self.running if r.finished]
        self.running = [r for r in self.running if not r.finished]
        return done

    def abort(self, requests):
        doomed = [r for r in requests if r in self.running]
        for r in doomed:
            r.finish(FinishReason.ABORT)
        self.running = [r for r in self.running if r not in doomed]
        self.aborted += doomed
        return doomed


def own_pages(request) -> int:
    return request.num_prompt_tokens + request.sampling.max_new_tokens


def make(slots=16, delay=0.0, pages=1 << 30, **config):
    registry = FakeRegistry({f"t{i}": 1 for i in range(30)} | {"A": 1, "B": 1})
    engine = FakeEngine(registry, slots, delay, pages)
    cfg = SchedulerConfig(**{"max_batch_wait_ms": 200.0, "max_batch_size": slots, **config})
    return engine, registry, Scheduler(engine, registry, cfg)


async def generate(sched, request: Request) -> Request:
    """Submit and wait for the finished request; raises its error if it failed."""
    sched.submit(request)
    async for event in sched.events(request):
        if event.kind == "error":
            raise event.error
    return request


def req(task, n=2, prompt=1, stream=False) -> Request:
    return Request([prompt], SamplingParams(max_new_tokens=n), task_id=task, stream=stream)


@pytest.fixture
async def running():
    started = []

    async def start(sched):
        await sched.start()
        started.append(sched)
        return sched

    yield start
    for sched in started:
        await sched.stop()


async def test_eight_tasks_are_admitted_together_with_prefixes_pinned(running):
    engine, registry, sched = make(slots=8)
    await running(sched)
    results = await asyncio.gather(*(generate(sched, req(f"t{i}", n=3)) for i in range(8)))
    assert engine.admissions == [[f"t{i}" for i in range(8)]]
    assert engine.pins_seen == [8, 8, 8] and registry.pinned() == 0
    assert all(r.prefix_version == 1 and r.prefix is None and len(r.output_token_ids) == 3 for r in results)


async def test_short_request_joins_a_running_batch_and_finishes_first(running):
    engine, _, sched = make(delay=0.01, max_batch_wait_ms=0.0)
    await running(sched)
    long = asyncio.create_task(generate(sched, req("A", n=60)))
    await asyncio.sleep(0.05)
    short = await generate(sched, req("B", n=4))
    assert not long.done() and short.finish_reason is FinishReason.LENGTH
    await long
    assert engine.admissions == [["A"], ["B"]]


async def test_static_batching_makes_the_short_request_wait(running):
    _engine, _, sched = make(delay=0.01, max_batch_wait_ms=0.0, continuous=False)
    await running(sched)
    long = asyncio.create_task(generate(sched, req("A", n=30)))
    await asyncio.sleep(0.05)
    await generate(sched, req("B", n=4))
    assert long.done()  # B was only admitted after A's batch ended


async def test_round_robin_admission_does_not_starve_a_quiet_task(running):
    engine, _, sched = make(slots=2, delay=0.005, max_batch_wait_ms=0.0)
    await running(sched)
    flood = [asyncio.create_task(generate(sched, req("A", n=3))) for _ in range(20)]
    await asyncio.sleep(0.02)
    # Planned so far (the loop plans; the worker thread may not have run those admissions yet).
    admitted_before = 20 - sched.num_waiting
    quiet = await generate(sched, req("B", n=3))
    assert quiet.finished
    order = [task for batch in engine.admissions for task in batch]
    # B takes the next free slot (round-robin across tasks), not a place behind the ~17 queued A's.
    assert order.index("B") <= admitted_before + 1
    await asyncio.gather(*flood)


async def test_token_budget_bounds_the_running_batch(running):
    engine, _, sched = make(delay=0.005, max_batch_wait_ms=50.0, max_batch_tokens=20)
    await running(sched)
    # each request: 4 (prefix) + 1 (prompt) + 5 (new) = 10 tokens -> two fit at a time
    await asyncio.gather(*(generate(sched, req(f"t{i}", n=5)) for i in range(5)))
    assert max(len(b) for b in engine.admissions) <= 2
    assert sched.running_tokens == 0
    with pytest.raises(InvalidRequest, match=r"request needs 25 tokens .* max-batch-tokens is 20"):
        sched.submit(req("t1", n=20))


async def test_full_queue_is_429(running):
    _engine, _, sched = make(slots=1, delay=0.05, max_batch_wait_ms=0.0, max_queue=2)
    await running(sched)
    first = asyncio.create_task(generate(sched, req("A", n=5)))
    await asyncio.sleep(0.02)
    queued = [asyncio.create_task(generate(sched, req("B", n=1))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full"):
        sched.submit(req("B"))
    await asyncio.gather(first, *queued)


async def test_one_bad_request_fails_alone(running):
    engine, registry, sched = make()
    await running(sched)
    registry.tasks["gone"] = 1
    submitted = [
        req("t1"),
        req("gone"),
        req("t2", prompt=666),
        Request([7], SamplingParams(max_new_tokens=2)),
    ]
    del_task = registry.tasks.pop  # 'gone' disappears between submit and admission

    async def submit_then_delete():
        for r in submitted:
            sched.submit(r)
        del_task("gone")
        finals = []
        for r in submitted:
            finals += [e async for e in sched.events(r) if e.kind != "token"]
        return finals

    finals = await submit_then_delete()
    assert [e.kind for e in finals] == ["done", "error", "error", "done"]
    assert isinstance(finals[1].error, PrefixNotFound) and isinstance(finals[2].error, InvalidRequest)
    assert engine.admissions == [["t1", None]] and registry.pinned() == 0
    with pytest.raises(PrefixNotFound):
        sched.submit(req("nope"))


async def test_engine_failure_fails_its_rows_and_serving_goes_on(running):
    engine, registry, sched = make(max_batch_wait_ms=0.0)
    await running(sched)
    engine.fail_next = True
    with pytest.raises(RuntimeError, match="exploded"):
        await generate(sched, req("t1"))
    ok = await generate(sched, req("t2", n=3))
    assert len(ok.output_token_ids) == 3 and registry.pinned() == 0 and sched.running_tokens == 0


async def test_streaming_events_then_done(running):
    _engine, _, sched = make(max_batch_wait_ms=0.0)
    await running(sched)
    r = req("t1", n=4, stream=True)
    sched.submit(r)
    events = [e async for e in sched.events(r)]
    assert [e.kind for e in events] == ["token"] * 4 + ["done"]
    assert [t for e in events[:-1] for t in e.token_ids] == [0, 1, 2, 3]
    assert "".join(e.text for e in events[:-1]) == "xxxx"


async def test_consumer_going_away_frees_the_row_within_a_step(running):
    engine, registry, sched = make(delay=0.01, max_batch_wait_ms=0.0)
    await running(sched)
    r = req("t1", n=1000, stream=True)
    sched.submit(r)

    async def consume_two():
        n = 0
        async for _ in sched.events(r):
            n += 1
            if n == 2:
                return  # the client disconnected

    await consume_two()
    steps_then = len(engine.pins_seen)
    for _ in range(100):
        if engine.aborted:
            break
        await asyncio.sleep(0.005)
    assert engine.aborted == [r] and r.finish_reason is FinishReason.ABORT
    assert len(engine.pins_seen) - steps_then <= 2 and registry.pinned() == 0


async def test_request_timeout(running):
    from server.errors import RequestTimeout

    _engine, registry, sched = make(delay=0.01, max_batch_wait_ms=0.0, request_timeout_s=0.05)
    await running(sched)
    with pytest.raises(RequestTimeout, match=r"0\.05 s request timeout"):
        await generate(sched, req("t1", n=1000))
    for _ in range(100):
        if registry.pinned() == 0:
            break
        await asyncio.sleep(0.005)
    assert registry.pinned() == 0


async def test_drain_finishes_accepted_requests_and_refuses_new_ones():
    _engine, _, sched = make(slots=1, delay=0.01, max_batch_wait_ms=0.0)
    await sched.start()
    a = asyncio.create_task(generate(sched, req("A", n=10)))
    b = asyncio.create_task(generate(sched, req("B", n=10)))  # queued behind A
    await asyncio.sleep(0.02)
    drain = asyncio.create_task(sched.drain(timeout=10))
    await asyncio.sleep(0)
    with pytest.raises(NotReady):
        sched.submit(req("t1"))
    await drain
    assert len((await a).output_token_ids) == 10 and len((await b).output_token_ids) == 10


async def test_drain_timeout_aborts_with_an_explicit_error():
    _engine, registry, sched = make(slots=1, delay=0.01, max_batch_wait_ms=0.0)
    await sched.start()
    a = asyncio.create_task(generate(sched, req("A", n=10_000)))
    await asyncio.sleep(0.03)
    await sched.drain(timeout=0.05)
    with pytest.raises(NotReady, match="shut down before the request finished"):
        await a
    assert registry.pinned() == 0


async def _served(sched, *requests, timeout=5.0):
    """Each request submitted and waited for, all within `timeout` seconds (a dead loop would hang)."""
    return await asyncio.wait_for(asyncio.gather(*(generate(sched, r) for r in requests)), timeout)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_abandoned_queued_request_leaves_the_others_served(running, stream):
    """The batch is full; A's queued request is abandoned (client gone, or its timeout); then requests of
    other tasks (and of A) are served, and the queue holds nothing of A."""
    engine, registry, sched = make(slots=1, delay=0.005, max_batch_wait_ms=0.0)
    await running(sched)
    blocker = asyncio.create_task(generate(sched, req("B", n=20)))
    await asyncio.sleep(0.02)
    assert engine.running  # the only slot is taken
    queued = req("A", n=3, stream=stream)
    sched.submit(queued)
    events = sched.events(queued)
    consumer = asyncio.create_task(anext(events))
    await asyncio.sleep(0.01)
    consumer.cancel()  # the client goes away while its request waits
    await asyncio.gather(consumer, return_exceptions=True)
    await events.aclose()
    assert (
        queued.finish_reason is FinishReason.ABORT
        and "A" not in sched.waiting.queues
        and "A" not in sched.waiting.rotation
    )
    later = await _served(sched, req("t1", n=2), req("A", n=2), req("t2", n=2))
    assert [len(r.output_token_ids) for r in later] == [2, 2, 2]
    await blocker
    assert registry.pinned() == 0 and sched.num_waiting == 0


async def test_a_request_timing_out_in_the_queue_leaves_the_others_served(running):
    from server.errors import RequestTimeout

    _engine, registry, sched = make(slots=1, delay=0.005, max_batch_wait_ms=0.0, request_timeout_s=0.05)
    await running(sched)
    blocker = asyncio.create_task(generate(sched, req("B", n=5)))
    await asyncio.sleep(0.01)
    with pytest.raises(RequestTimeout):
        await generate(sched, req("A", n=1000))  # waits behind B, then times out while still queued
    await asyncio.gather(blocker, return_exceptions=True)
    (done,) = await _served(sched, req("t3", n=2))
    assert len(done.output_token_ids) == 2 and registry.pinned() == 0


async def test_a_request_abandoned_between_planning_and_admission_is_never_run(running):
    """The client leaves while its request is planned but not yet in the batch (the engine worker is busy
    with the step that admits it): the row is dropped at once, not run to max_new_tokens."""
    engine, registry, sched = make(slots=4, delay=0.05, max_batch_wait_ms=0.0)
    await running(sched)
    r = req("A", n=10_000, stream=True)
    sched.submit(r)
    await asyncio.sleep(0.01)  # planned; the worker is inside the step that admits it
    assert r not in sched.waiting.queues.get("A", ())
    sched.abort(r)
    for _ in range(200):
        if r.finished:
            break
        await asyncio.sleep(0.01)
    assert r.finish_reason is FinishReason.ABORT and not engine.running and registry.pinned() == 0
    assert len(r.output_token_ids) <= 2


async def test_a_planning_bug_fails_the_requests_it_touched_and_the_loop_goes_on(running):
    _engine, registry, sched = make(slots=2, delay=0.0, max_batch_wait_ms=0.0)
    await running(sched)
    broken = req("A", n=2)
    sched.submit(broken)
    broken.budget_tokens = None  # planning compares it with the budget: TypeError inside plan()
    event = await asyncio.wait_for(anext(sched.events(broken)), 5)
    assert event.kind == "error" and "failed to plan this request" in str(event.error)
    assert sched.loop_running and not sched.waiting.queues and not sched.waiting.rotation
    (ok,) = await _served(sched, req("B", n=3))
    assert len(ok.output_token_ids) == 3 and registry.pinned() == 0


async def test_a_failing_iteration_is_logged_and_the_loop_goes_on(running, caplog, monkeypatch):
    _engine, _, sched = make(slots=2, delay=0.0, max_batch_wait_ms=0.0)
    await running(sched)
    calls = {"n": 0}
    postprocess = sched._postprocess

    def flaky(finished):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("postprocess bug")
        postprocess(finished)

    monkeypatch.setattr(sched, "_postprocess", flaky)
    sched.submit(first := req("A", n=3))
    (ok,) = await _served(sched, req("B", n=3))
    assert len(ok.output_token_ids) == 3 and sched.loop_running
    assert "scheduler iteration failed" in caplog.text
    del first


async def test_submit_refuses_when_the_loop_is_not_running():
    _engine, _, sched = make()
    await sched.start()
    sched._task.cancel()
    await asyncio.gather(sched._task, return_exceptions=True)
    assert not sched.loop_running
    with pytest.raises(NotReady, match="scheduler loop stopped"):
        sched.submit(req("A"))
    sched._task = None
    await sched.stop()


# ---- prefixes load off the engine thread (server/prefetch.py) ----


async def until(condition, timeout: float = 5.0) -> None:
    """Wait for `condition()` (a scheduler that stops answering fails the test instead of hanging it)."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


async def finals(sched, request, timeout: float = 5.0) -> list:
    """The request's events to its final one."""

    async def collect():
        return [e async for e in sched.events(request)]

    return await asyncio.wait_for(collect(), timeout)


def gated(registry, *cold_tasks) -> threading.Event:
    """New tasks whose loads (of any version) wait until the test sets the gate."""
    registry.tasks |= {task: 1 for task in cold_tasks}
    registry.gated |= set(cold_tasks)
    return registry.gate


async def test_a_stream_runs_to_its_end_while_another_prefix_loads(running):
    """The cold prefix of an earlier request is stuck in the store; a stream of a cached task still gets
    every token. (When the engine thread loaded prefixes, the stream stalled behind that load.)"""
    engine, registry, sched = make(max_batch_wait_ms=0.0)
    await running(sched)
    gate = gated(registry, "cold")
    try:
        cold = req("cold", n=3)
        sched.submit(cold)
        hot = req("A", n=5, stream=True)
        sched.submit(hot)
        events = await finals(sched, hot)
        assert [e.kind for e in events] == ["token"] * 5 + ["done"]
        assert registry.num_loads_ended == 0 and cold.status is RequestStatus.WAITING
        assert sched.num_waiting == 1 and sched.num_ready == 0 and engine.admissions == [["A"]]
    finally:
        gate.set()
    assert [e.kind for e in await finals(sched, cold)] == ["done"]
    assert cold.prefix_version == 1 and len(cold.output_token_ids) == 3
    assert engine.admissions == [["A"], ["cold"]] and registry.pinned() == 0


async def test_a_loaded_request_carries_its_prefix_and_the_key_of_its_content(running):
    engine, registry, sched = make(slots=2, max_batch_wait_ms=0.0)
    await running(sched)
    seen = []
    admit = engine.admit
    engine.admit = lambda requests: (
        seen.extend((r.prefix_version, r.prefix_key) for r in requests) or admit(requests)
    )
    registry.tasks["new"] = 3  # cold: loads on its own thread
    await _served(sched, req("A"), req("new"))
    assert sorted(seen) == [(1, ("A", 1, None)), (3, ("new", 3, None))]
    assert registry.num_loads_ended == 1 and registry.pinned() == 0


async def test_a_burst_for_a_cold_task_loads_its_prefix_once(running):
    _engine, registry, sched = make(slots=8, max_batch_wait_ms=0.0)
    await running(sched)
    gate = gated(registry, "cold")
    burst = [req("cold", n=2) for _ in range(5)]
    for r in burst:
        sched.submit(r)
    sched.abort(burst[1])  # one leaves while it waits for the others' load
    gate.set()
    await _served_already(sched, *burst[:1], *burst[2:])
    assert registry.num_loads_started == 1 and burst[1].finish_reason is FinishReason.ABORT
    assert all(r.prefix_version == 1 for r in burst[2:]) and registry.pinned() == 0


@pytest.mark.parametrize("how", ["client gone", "abort"])
async def test_a_request_abandoned_while_its_prefix_loads_ends_now_and_its_pin_later(running, how):
    engine, registry, sched = make(max_batch_wait_ms=0.0)
    await running(sched)
    gate = gated(registry, "cold")
    r = req("cold", n=3, stream=True)
    sched.submit(r)
    await until(lambda: registry.num_loads_started == 1)  # its load is inside the store
    if how == "abort":
        sched.abort(r)
    else:
        events = sched.events(r)
        consumer = asyncio.create_task(anext(events))
        await asyncio.sleep(0.01)
        consumer.cancel()  # the client goes away while its prefix loads
        await asyncio.gather(consumer, return_exceptions=True)
        await events.aclose()
    assert r.finish_reason is FinishReason.ABORT and sched.num_waiting == 0
    gate.set()
    await until(lambda: registry.num_loads_ended == 1 and registry.pinned() == 0)
    (again,) = await _served(sched, req("cold", n=2))  # cached now
    assert len(again.output_token_ids) == 2 and engine.admissions == [["cold"]]
    assert registry.pinned() == 0 and not sched.waiting.queues


async def test_a_failing_load_fails_its_own_request_only(running, caplog):
    engine, registry, sched = make()
    await running(sched)
    registry.tasks |= {"broken": 1, "full": 1}
    registry.fail = {"broken": OSError("disk on fire"), "full": Overloaded("prefix cache is full")}
    ok, broken, full = req("A", n=3), req("broken"), req("full")
    results = await asyncio.wait_for(
        asyncio.gather(*(generate(sched, r) for r in (broken, ok, full)), return_exceptions=True), 5
    )
    assert type(results[0]) is PrefixServerError
    assert str(results[0]) == (
        "the prefix of task 'broken' could not be loaded (OSError); see the server log"
    )
    assert "loading the prefix of task 'broken' failed" in caplog.text and "disk on fire" in caplog.text
    assert results[1] is ok and len(ok.output_token_ids) == 3
    assert isinstance(results[2], Overloaded) and broken.finish_reason is FinishReason.ERROR
    assert engine.admissions == [["A"]] and registry.pinned() == 0 and sched.running_tokens == 0


async def test_a_hot_swap_keeps_each_requests_version(running):
    """A new version arrives while one request of the task loads and one of another task runs: each
    keeps the version it resolved; requests after the swap get the new one; every pin is given back."""
    engine, registry, sched = make(slots=4, delay=0.005, max_batch_wait_ms=0.0)
    await running(sched)
    run_v1 = asyncio.create_task(generate(sched, req("A", n=10_000)))
    await until(lambda: engine.running)
    gate = gated(registry, "S")
    try:
        load_v1 = req("S", n=2)
        sched.submit(load_v1)
        await until(lambda: registry.num_loads_started == 1)  # S v1 resolved, its read stuck
        registry.tasks |= {"S": 2, "A": 2}  # the uploads of new versions return
        new_s = req("S", n=2)
        sched.submit(new_s)  # v2 is cold too: its load waits at the same gate
        (new_a,) = await _served(sched, req("A", n=2))
        assert new_a.prefix_version == 2 and engine.running[0].prefix_version == 1
        assert registry.pins[FakeRecord("A", 1)] == 1 and not load_v1.finished
    finally:
        gate.set()
    await _served_already(sched, load_v1, new_s)
    assert (load_v1.prefix_version, new_s.prefix_version) == (1, 2)
    sched.abort(engine.running[0])
    assert (await run_v1).prefix_version == 1
    assert registry.pinned() == 0


async def _served_already(sched, *requests):
    """Requests submitted earlier, waited for to their final events."""
    for r in requests:
        assert [e.kind for e in await finals(sched, r)] == ["done"]


async def test_requests_whose_prefix_loads_count_toward_the_full_queue(running):
    _engine, registry, sched = make(max_queue=2)
    await running(sched)
    gate = gated(registry, "c1", "c2")
    loading = [req("c1"), req("c2")]
    for r in loading:
        sched.submit(r)
    assert sched.num_waiting == 2 and sched.num_ready == 0
    with pytest.raises(Overloaded, match="queue is full"):
        sched.submit(req("A"))
    gate.set()
    await _served_already(sched, *loading)
    assert registry.pinned() == 0


async def test_stop_while_a_prefix_loads_does_not_wait_for_it():
    _engine, registry, sched = make(max_batch_wait_ms=0.0)
    await sched.start()
    gate = gated(registry, "cold")
    r = req("cold")
    sched.submit(r)
    await until(lambda: registry.num_loads_started == 1)  # its load is inside the store
    await asyncio.wait_for(sched.stop(), 5)
    (event,) = await finals(sched, r)
    assert event.kind == "error" and isinstance(event.error, NotReady)
    gate.set()
    await until(lambda: registry.num_loads_ended == 1 and registry.pinned() == 0)


async def test_drain_waits_for_a_loading_request_within_its_timeout():
    _engine, registry, sched = make(max_batch_wait_ms=0.0)
    await sched.start()
    gate = gated(registry, "cold", "stuck")
    r = req("cold", n=3)
    sched.submit(r)
    drain = asyncio.create_task(sched.drain(timeout=10))
    await asyncio.sleep(0.02)
    assert not drain.done()  # an accepted request still loads
    gate.set()
    await asyncio.wait_for(drain, 5)
    assert r.finish_reason is FinishReason.LENGTH and registry.pinned() == 0

    _engine, registry, sched = make(max_batch_wait_ms=0.0)
    await sched.start()
    gate = gated(registry, "stuck")
    r = req("stuck")
    sched.submit(r)
    await until(lambda: registry.num_loads_started == 1)
    await asyncio.wait_for(sched.drain(timeout=0.05), 5)  # the load outlives the drain: failed
    (event,) = await finals(sched, r)
    assert event.kind == "error" and isinstance(event.error, NotReady)
    gate.set()
    await until(lambda: registry.num_loads_ended == 1 and registry.pinned() == 0)


# ---- admission by K/V pages ----


async def test_admission_stops_at_the_free_pages(running):
    engine, _, sched = make(pages=20, max_batch_wait_ms=50.0)
    await running(sched)
    # each: 1 (prompt) + 5 (new) own pages + 4 of its prefix = 10 -> two at a time
    await _served(sched, *(req(f"t{i}", n=5) for i in range(5)))
    assert engine.admissions == [["t0", "t1"], ["t2", "t3"], ["t4"]] and engine.max_pages_used == 20
    assert sched.running_tokens == 0


def tenant_req(tenant, task, n) -> Request:
    return Request([1], SamplingParams(max_new_tokens=n), task_id=task, tenant=tenant)


async def test_a_prefix_is_counted_once_per_plan_and_only_for_requests_that_go(running):
    engine, _, sched = make(pages=16, max_batch_wait_ms=50.0)
    await running(sched)
    # A, A: 6 + 6 own pages + 4 for prefix A once = 16: both go. B of tenant x (10) does not fit; its
    # prefix must not count as paid for, or B of tenant y (6 own pages) would slip in over the limit.
    first = [
        tenant_req("x", "A", 5),
        tenant_req("x", "A", 5),
        tenant_req("x", "B", 5),
        tenant_req("y", "B", 5),
    ]
    results = await _served(sched, *first)
    assert all(len(r.output_token_ids) == 5 for r in results)
    assert engine.admissions[0] == ["A", "A"] and engine.max_pages_used == 16


async def test_a_request_blocked_by_pages_keeps_its_place_and_goes_when_pages_free_up(running):
    """A running row holds all but 5 pages: a request needing 105 waits (it is not failed, and it keeps
    the head of its queue) while a 5-page request of another queue goes; when the big row ends, it goes.
    Nothing reserves pages for a blocked request: under a steady flow of small requests from other
    queues it could wait as long as they keep the pages taken."""
    engine, registry, sched = make(pages=10_010, max_batch_wait_ms=0.0)
    await running(sched)
    big = asyncio.create_task(generate(sched, req("A", n=10_000)))  # 10_001 + 4 = 10_005 pages
    await until(lambda: engine.running)
    blocked, small = req("B", n=100), Request([1], SamplingParams(max_new_tokens=4))  # 105; 5 pages
    sched.submit(blocked)
    sched.submit(small)
    assert [e.kind for e in await finals(sched, small)] == ["done"]
    assert blocked.status is RequestStatus.WAITING and sched.waiting.queues["B"][0] is blocked
    sched.abort(engine.running[0])  # the big row ends: its pages free up
    assert [e.kind for e in await finals(sched, blocked)] == ["done"]
    assert engine.admissions == [["A"], [None], ["B"]] and len(blocked.output_token_ids) == 100
    assert (await big).finish_reason is FinishReason.ABORT and registry.pinned() == 0


async def test_a_request_larger_than_every_page_fails_instead_of_waiting_forever(running):
    engine, registry, sched = make(pages=20, max_batch_wait_ms=0.0)
    await running(sched)
    huge, ok = req("A", n=30), req("B", n=5)  # 1 + 30 + 4 = 35 pages of 20; 10 pages
    results = await asyncio.wait_for(
        asyncio.gather(generate(sched, huge), generate(sched, ok), return_exceptions=True), 5
    )
    assert isinstance(results[0], InvalidRequest)
    assert "request needs 35 K/V pages (prefix + prompt + max_new_tokens), the engine has 20" in str(
        results[0]
    )
    assert results[1] is ok and len(ok.output_token_ids) == 5
    assert engine.admissions == [["B"]] and registry.pinned() == 0 and not sched.waiting.queues
