"""A server's life through its Runtime (server/api/runtime.py): start -> serve -> drain (SIGTERM's path)
-> close, on the real app over a tiny model; and a start that fails to load."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import app_client, make_tiny_model, tiny_app, wait_for_load_error

from server.api.app import create_app
from server.config import Settings
from server.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(make_tiny_model("llama-gqa"), tokenizer)


async def test_drain_soon_finishes_accepted_requests_then_calls_back(tmp_path, engine):
    """SIGTERM's path: the runtime stops admitting (/ready 503, new requests 503), lets a running
    request finish whole, then calls back (the server then exits)."""
    app = tiny_app(engine, tmp_path / "p", shutdown_timeout_s=30.0)
    runtime = app.state.runtime
    assert not runtime.drain_soon(lambda: None)  # not started: nothing to drain, stop at once
    async with app_client(app) as client:
        assert (await client.get("/ready")).status_code == 200
        long = {"prompt": "abc", "max_new_tokens": 40, "ignore_eos": True}
        running = asyncio.create_task(client.post("/generate", json=long))
        scheduler = app.state.server.scheduler
        for _ in range(500):
            if scheduler.num_running:
                break
            await asyncio.sleep(0.01)
        drained = asyncio.Event()
        assert runtime.drain_soon(drained.set)
        for _ in range(100):  # the drain starts on the loop, as from a signal handler
            if not app.state.server.ready:
                break
            await asyncio.sleep(0.01)
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "shutting down" in ready.text
        refused = await client.post("/generate", json={"prompt": "x", "max_new_tokens": 1})
        assert refused.status_code == 503
        await asyncio.wait_for(drained.wait(), 30)
        reply = await running
        assert reply.status_code == 200 and len(reply.json()["token_ids"]) == 40
        assert not runtime.compiling


async def test_start_is_once_and_close_stops_the_scheduler(tmp_path, engine):
    app = tiny_app(engine, tmp_path / "p")
    runtime = app.state.runtime
    async with app_client(app):
        scheduler = app.state.server.scheduler
        await runtime.start()  # a second start (the Ray replica and a lifespan both) changes nothing
        assert app.state.server.scheduler is scheduler and scheduler.loop_running
    assert not app.state.server.ready and not scheduler.loop_running  # the lifespan closed it


async def test_a_second_lifespan_serves_again(tmp_path, engine):
    """An app's lifespan may run more than once (schemathesis starts and stops it per test): after a
    close, start serves again on a new scheduler."""
    app = tiny_app(engine, tmp_path / "p")
    async with app_client(app):
        first = app.state.server.scheduler
    async with app_client(app) as client:
        assert app.state.server.scheduler is not first and app.state.server.ready
        reply = await client.post("/generate", json={"prompt": "ab", "max_new_tokens": 2})
        assert reply.status_code == 200


async def test_a_failed_load_is_reported_not_raised(tmp_path):
    app = create_app(Settings(model=str(tmp_path / "no-such-model"), prefix_dir=tmp_path / "p"))
    async with app_client(app) as client:
        assert await wait_for_load_error(app)
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "startup failed" in ready.text
        assert not app.state.runtime.drain_soon(lambda: None)  # SIGTERM while not serving: exit at once


async def test_the_request_timeout_ends_each_kind_of_reply_and_is_counted(tmp_path, engine):
    """The generation service turns the scheduler's request timeout into an error for every wire format:
    a plain /generate is a 504, a stream's last event an `error` one, an OpenAI reply a 504 in OpenAI's
    shape; each request is counted with status `timeout` and its row freed."""
    app = tiny_app(engine, tmp_path / "p", request_timeout_s=0.05)
    long = {"prompt": "abc", "max_new_tokens": 400, "ignore_eos": True}
    async with app_client(app) as client:
        plain = await client.post("/generate", json=long)
        assert plain.status_code == 504 and plain.json()["error"]["code"] == "timeout"
        streamed = await client.post("/generate", json={**long, "stream": True})
        last = json.loads(streamed.text.strip().split("\n\n")[-1].removeprefix("data: "))
        assert last == {"type": "error", "error": {"code": "timeout", "message": last["error"]["message"]}}
        openai = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 400, "ignore_eos": True}
        )
        assert openai.status_code == 504 and openai.json()["error"]["code"] == "timeout"
        metrics = (await client.get("/metrics")).text
        assert 'prefix_server_requests_total{status="timeout",task="__base__"} 3.0' in metrics
        scheduler = app.state.server.scheduler
        for _ in range(200):
            if not scheduler.num_running:
                break
            await asyncio.sleep(0.01)
        assert scheduler.num_running == 0
