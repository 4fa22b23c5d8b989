"""Torch work outside the engine thread runs on threads that end with it (server/threads.py): a live
thread that ran parallel torch ops keeps an OpenMP team, and two teams slow every decode step."""

from __future__ import annotations

import threading

from conftest import app_client, wait_for_load_error

import server.api.runtime as runtime_module
from server.api.app import create_app
from server.config import Settings
from server.threads import in_own_thread


async def test_in_own_thread_runs_off_the_loop_on_a_thread_that_ends():
    seen = []
    result = await in_own_thread(lambda x: seen.append(threading.current_thread()) or x * 2, 21)
    assert result == 42
    (thread,) = seen
    assert thread is not threading.main_thread()
    thread.join(timeout=5)
    assert not thread.is_alive()


async def test_model_loading_thread_is_gone_once_ready(tmp_path, monkeypatch):
    """The start-up path: the thread that built the components (loaded the model) no longer exists, so
    the engine thread's OpenMP team is the only one (asyncio.to_thread's would live on)."""
    loaders = []

    def fake_build(settings):
        loaders.append(threading.current_thread())
        raise RuntimeError("stop after recording the thread")  # the app then reports a load error

    monkeypatch.setattr(runtime_module, "build_components", fake_build)
    app = create_app(Settings(prefix_dir=tmp_path, compile="off"))
    async with app_client(app) as client:
        assert await wait_for_load_error(app)
        assert "stop after recording the thread" in (await client.get("/ready")).text
    (loader,) = loaders
    loader.join(timeout=5)
    assert not loader.is_alive()
