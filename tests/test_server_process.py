"""The real server process on the default model: upload -> generate -> swap -> generate, over TCP."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save

from loadtest import serverproc

pytestmark = pytest.mark.slow


def start_server(prefix_dir, log, *extra: str) -> tuple[subprocess.Popen, str]:
    try:
        return serverproc.start(["--prefix-dir", str(prefix_dir), *extra], log=log)
    except serverproc.ServerNotReady as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prefix_dir = tmp_path_factory.mktemp("prefixes")
    with open(prefix_dir.parent / "server.log", "w+") as log:
        proc, base = start_server(prefix_dir, log, "--max-batch-wait-ms", "20")
        try:
            yield base, proc
        finally:
            serverproc.stop(proc)


def test_upload_generate_swap_generate(server):
    base, proc = server
    with httpx.Client(base_url=base, timeout=120) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ask = {"task_id": "style", "prompt": "What is the capital of France?", "max_new_tokens": 12}
        assert client.post("/generate", json=ask).status_code == 404

        r1 = client.post("/prefixes/from-text", json={"task_id": "style", "text": "Answer in French only."})
        assert r1.status_code == 201 and r1.json()["version"] == 1
        out1 = client.post("/generate", json=ask).json()
        assert out1["prefix_version"] == 1
        prepended = client.post(
            "/generate", json={**ask, "task_id": None, "prompt": "Answer in French only." + ask["prompt"]}
        )
        assert out1["token_ids"] == prepended.json()["token_ids"]

        # Swap: a PEFT adapter file (random, small) for the same task.
        gen = torch.Generator().manual_seed(0)
        emb = torch.randn((8, 30 * 2 * 3 * 64), generator=gen) * 0.5  # [P, layers*2*kv_heads*head_dim]
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": 8,
            "num_layers": 30,
        }
        files = {
            "file": ("adapter_model.safetensors", save({"prompt_embeddings": emb})),
            "config": ("adapter_config.json", json.dumps(config).encode()),
        }
        r2 = client.post("/prefixes", data={"task_id": "style"}, files=files)
        assert r2.status_code == 201, r2.text
        assert r2.json()["version"] == 2 and r2.json()["num_virtual_tokens"] == 8
        out2 = client.post("/generate", json=ask).json()
        assert out2["prefix_version"] == 2 and out2["token_ids"] != out1["token_ids"]

        # A bad upload changes nothing.
        bad = client.post("/prefixes", data={"task_id": "style"}, files={"file": ("x.safetensors", b"junk")})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_prefix"
        assert client.get("/prefixes/style").json()["version"] == 2
    assert proc.poll() is None


def test_streaming_over_tcp(server):
    base, _ = server
    body = {"prompt": "Count from one to ten:", "max_new_tokens": 12, "ignore_eos": True}
    with httpx.Client(base_url=base, timeout=120) as client:
        plain = client.post("/generate", json=body).json()
        events = []
        with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert [e["token_id"] for e in events if e["type"] == "token"] == plain["token_ids"]
    assert events[-1]["type"] == "done" and events[-1]["text"] == plain["text"]


def test_sigterm_drains_running_requests_then_exits(tmp_path):
    with open(tmp_path / "server.log", "w+") as log:
        proc, base = start_server(tmp_path / "prefixes", log, "--shutdown-timeout-s", "120")
        try:
            result: dict = {}

            def long_request():
                body = {"prompt": "Tell me a long story.", "max_new_tokens": 48, "ignore_eos": True}
                result["resp"] = httpx.post(base + "/generate", json=body, timeout=300)

            worker = threading.Thread(target=long_request)
            worker.start()
            time.sleep(1.0)  # the request is running now
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(base + "/ready", timeout=10)
            assert ready.status_code == 503 and "shutting down" in ready.json()["error"]["message"]
            refused = httpx.post(base + "/generate", json={"prompt": "hi"}, timeout=10)
            assert refused.status_code == 503
            worker.join(timeout=300)
            assert result["resp"].status_code == 200, result["resp"].text
            assert result["resp"].json()["usage"]["completion_tokens"] == 48
            assert proc.wait(timeout=60) == 0, serverproc.tail(log)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_sigterm_during_a_background_compile_exits_cleanly(tmp_path, monkeypatch):
    """--compile auto on a cold inductor cache: SIGTERM while the compile runs exits 0 at once (the
    interpreter's teardown under a running compile aborted the process: exit 134)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold: minutes of compiling
    with open(tmp_path / "server.log", "w+") as log:
        proc, _ = start_server(tmp_path / "prefixes", log, "--compile", "auto")
        try:
            time.sleep(3)  # the compile thread is running (a bucket takes ~50 s cold)
            assert serverproc.stop(proc, timeout_s=60) == 0, serverproc.tail(log)
            assert "exiting with the decode step's compile unfinished" in serverproc.tail(log)
        finally:
            if proc.poll() is None:
                proc.kill()
