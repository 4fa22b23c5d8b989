"""Prefixes load off the engine thread, through the real app on a tiny model: a stream runs to its end
while another task's prefix is stuck in a slow store; a hot swap or a delete meanwhile; the slow-store
knob (--store-read-delay-ms)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import app_client, make_tiny_model, tiny_app
from test_api import parse_sse

from server.cli import build_parser
from server.config import Settings
from server.engine.engine import Engine
from server.errors import ConfigError
from server.registry.format import load_prefix, save_native
from server.request import Request, SamplingParams

FAMILY = "llama-gqa"


@pytest.fixture
def engine(tokenizer):
    return Engine(make_tiny_model(FAMILY), tokenizer)


def native(engine, num_virtual_tokens: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save_native(
        engine.encode_prefix(torch.randint(2, 200, (num_virtual_tokens,), generator=gen).tolist())
    )


async def upload(client, task_id: str, data: bytes) -> int:
    resp = await client.post("/prefixes", data={"task_id": task_id}, files={"file": ("p.safetensors", data)})
    assert resp.status_code == 201, resp.text
    return resp.json()["version"]


class GatedReads:
    """The store's reads of the chosen (task_id, version)s wait until the test sets `gate`: a slow store
    the test controls, so nothing here depends on timing."""

    def __init__(self, store, *held: tuple[str, int]):
        self.read, self.held = store.read, set(held)
        self.gate, self.entered = threading.Event(), threading.Event()

    def __call__(self, record):
        if (record.task_id, record.version) in self.held:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self.read(record)


async def until(condition, timeout: float = 30.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def ask(task_id, prompt: str = "abc", n: int = 6) -> dict:
    return {"task_id": task_id, "prompt": prompt, "max_new_tokens": n, "ignore_eos": True}


def alone(engine, data: bytes, prompt: str, n: int) -> list[int]:
    """The greedy tokens of one request with this prefix, on the engine directly (while the app idles)."""
    request = Request(
        engine.tokenizer(prompt)["input_ids"],
        SamplingParams(max_new_tokens=n, ignore_eos=True),
        prefix=load_prefix(data, engine.fingerprint),
    )
    engine.generate([request])
    return request.output_token_ids


@pytest.mark.timeout(120)
async def test_a_stream_runs_to_its_end_while_another_tasks_prefix_is_stuck_in_the_store(
    tmp_path, engine, monkeypatch
):
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=0.0)
    async with app_client(app) as client:
        await upload(client, "hot", native(engine, 4, 1))
        await upload(client, "cold", native(engine, 5, 2))
        plain = await client.post("/generate", json=ask("hot", n=8))  # "hot" is in the cache from now on
        assert plain.status_code == 200, plain.text
        registry = app.state.server.components.registry
        reads = GatedReads(registry.store, ("cold", 1))
        monkeypatch.setattr(registry.store, "read", reads)
        try:
            cold = asyncio.create_task(client.post("/generate", json=ask("cold", n=4)))
            await until(reads.entered.is_set)  # the cold load is inside the store read
            body = {**ask("hot", n=8), "stream": True}
            stream = asyncio.create_task(client.post("/generate", json=body))
            await until(stream.done)  # fails (not hangs) if the stream stalls behind the load
            streamed = stream.result()
            events = parse_sse(streamed.text)
            assert [e["token_id"] for e in events if e["type"] == "token"] == plain.json()["token_ids"]
            assert events[-1]["type"] == "done" and events[-1]["prefix_version"] == 1
            assert not cold.done() and app.state.server.scheduler.num_waiting == 1
        finally:
            reads.gate.set()
        reply = await asyncio.wait_for(cold, 30)
        assert reply.status_code == 200 and reply.json()["prefix_version"] == 1, reply.text
        assert registry.cache.stats()["num_pinned"] == 0


@pytest.mark.timeout(120)
async def test_a_hot_swap_while_a_prefix_loads_keeps_each_requests_version(tmp_path, engine, monkeypatch):
    """v1's read is stuck when v2 is uploaded: a request after the upload is served v2 meanwhile. The
    upload removed v1's file, so the stuck read fails and that request resolves again (the registry's
    rule, as before prefetch): it is served v2 too. Each reply names the version whose output it has."""
    v1, v2 = native(engine, 4, 3), native(engine, 6, 4)
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=0.0)
    async with app_client(app) as client:
        await upload(client, "swap", v1)
        registry = app.state.server.components.registry
        reads = GatedReads(registry.store, ("swap", 1))
        monkeypatch.setattr(registry.store, "read", reads)
        try:
            first = asyncio.create_task(client.post("/generate", json=ask("swap")))
            await until(reads.entered.is_set)
            assert await upload(client, "swap", v2) == 2
            second = await asyncio.wait_for(client.post("/generate", json=ask("swap")), 30)
            assert second.status_code == 200 and second.json()["prefix_version"] == 2, second.text
            assert not first.done()
        finally:
            reads.gate.set()
        first = await asyncio.wait_for(first, 30)
        assert first.status_code == 200 and first.json()["prefix_version"] == 2, first.text
        assert registry.cache.stats()["num_pinned"] == 0
        expected = alone(engine, v2, "abc", 6)
        assert first.json()["token_ids"] == second.json()["token_ids"] == expected
        assert expected != alone(engine, v1, "abc", 6)


@pytest.mark.timeout(120)
async def test_a_task_deleted_while_its_prefix_loads_is_404(tmp_path, engine, monkeypatch):
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=0.0)
    async with app_client(app) as client:
        await upload(client, "gone", native(engine, 4, 5))
        registry = app.state.server.components.registry
        reads = GatedReads(registry.store, ("gone", 1))
        monkeypatch.setattr(registry.store, "read", reads)
        try:
            doomed = asyncio.create_task(client.post("/generate", json=ask("gone")))
            await until(reads.entered.is_set)
            assert (await client.delete("/prefixes/gone")).status_code == 204
        finally:
            reads.gate.set()
        reply = await asyncio.wait_for(doomed, 30)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "task_not_found", reply.text
        ok = await client.post("/generate", json=ask(None))
        assert ok.status_code == 200 and registry.cache.stats()["num_pinned"] == 0


@pytest.mark.timeout(120)
async def test_the_slow_store_knob_delays_each_read_of_a_prefix_file(tmp_path, engine, monkeypatch):
    import server.registry.registry as registry_module

    naps: list[float] = []
    sleep = registry_module.time.sleep

    def recorded(seconds):
        naps.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(registry_module.time, "sleep", recorded)
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=0.0, store_read_delay_ms=40.0)
    async with app_client(app) as client:
        await upload(client, "slow", native(engine, 4, 6))
        for _ in range(2):  # a cold load (one read of the file), then a cache hit (none)
            assert (await client.post("/generate", json=ask("slow"))).status_code == 200
    assert naps.count(0.04) == 1


def test_the_slow_store_knob_is_a_flag_and_a_variable():
    serve = build_parser().parse_args(["serve", "--store-read-delay-ms", "250"])
    assert serve.store_read_delay_ms == 250.0
    env = {"PREFIX_SERVER_STORE_READ_DELAY_MS": "12.5"}
    assert Settings.from_env(environ=env).store_read_delay_ms == 12.5
    assert Settings().store_read_delay_ms == 0.0
    with pytest.raises(ConfigError, match="store_read_delay_ms must be >= 0"):
        Settings(store_read_delay_ms=-1.0)
