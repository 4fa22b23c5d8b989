"""Clients that leave: a real server process (tiny model, one row) whose only row is busy; streaming and
plain clients of one task leave while their requests wait in the queue, then the busy row's own plain
client leaves. Every abandoned request is dropped (the queue and the batch empty out at once), requests of
other tasks and tenants are served, /ready stays true to the loop, and SIGTERM drains and exits 0.
(Before: an abandoned queued request left an empty queue in the rotation, the scheduler's loop died on
it without a log line, later requests never got a reply and SIGTERM's drain never ended.)"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import time

import httpx
import pytest
import torch
from conftest import byte_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from loadtest import serverproc

ADMIN, ACME, GLOBEX = "admin-secret", "acme-secret", "globex-secret"
LONG = 15_000  # new tokens: the busy row would run for tens of seconds if its client's leaving went unseen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a long context, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LONG + 512,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=0,
    )
    folder = tmp_path_factory.mktemp("tiny-long")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def server(model_dir, tmp_path):
    keys = {
        "admin": [ADMIN],
        "tenants": {"acme": [ACME], "globex": ["sha256:" + hashlib.sha256(GLOBEX.encode()).hexdigest()]},
    }
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    args = ["--model", str(model_dir), "--prefix-dir", str(tmp_path / "prefixes")]
    args += ["--api-keys-file", str(tmp_path / "keys.json"), "--compile", "off", "--max-batch-size", "1"]
    args += ["--max-batch-wait-ms", "1", "--max-new-tokens", str(LONG), "--shutdown-timeout-s", "30"]
    with open(tmp_path / "server.log", "w+") as log, serverproc.running(args, log=log, timeout_s=120) as run:
        yield (*run, log)


def raw_post(base: str, key: str, body: dict) -> socket.socket:
    """A POST sent over a socket that the test then closes without reading: a client that leaves."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (
        f"POST {'/v1/completions' if 'model' in body else '/generate'} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + data)
    return sock


def gauges(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    names = ("prefix_server_queue_depth", "prefix_server_running_batch_size")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(names)}


def wait_for(client: httpx.Client, queue: int, running: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    seen = {}
    while time.monotonic() < deadline:
        seen = gauges(client)
        if seen == {"prefix_server_queue_depth": queue, "prefix_server_running_batch_size": running}:
            return
        time.sleep(0.05)
    pytest.fail(f"expected queue {queue}, running {running} within {timeout_s} s; saw {seen}")


@pytest.mark.timeout(240)
def test_abandoned_requests_leave_the_server_serving_everyone(server):
    proc, base, log = server
    acme = httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {ACME}"})
    globex = httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {GLOBEX}"})
    ops = httpx.Client(base_url=base, timeout=60)
    for client, task in ((acme, "alpha"), (globex, "beta")):
        r = client.post("/prefixes/from-text", json={"task_id": task, "text": f"{task} says:"})
        assert r.status_code == 201, r.text

    # The one row is busy with a long plain request, then requests of task alpha queue behind it.
    busy = raw_post(
        base, ACME, {"task_id": "alpha", "prompt": "go", "max_new_tokens": LONG, "ignore_eos": True}
    )
    wait_for(ops, queue=0, running=1)
    queued = [
        raw_post(
            base, ACME, {"task_id": "alpha", "prompt": f"q{i}", "max_new_tokens": 4, "stream": i % 2 == 0}
        )
        for i in range(4)
    ]
    queued.append(raw_post(base, ACME, {"model": "alpha", "prompt": "openai", "max_tokens": 4}))
    wait_for(ops, queue=5, running=1)
    for sock in queued:  # they leave while waiting
        sock.close()
    wait_for(ops, queue=0, running=1)
    busy.close()  # a plain client leaving mid-generation frees its row within a step
    wait_for(ops, queue=0, running=0, timeout_s=10)

    # Everyone else is served: another tenant's task, the same tenant's task and base model.
    ask = {"prompt": "hello", "max_new_tokens": 5, "ignore_eos": True}
    for client, task in ((globex, "beta"), (acme, "alpha"), (acme, None)):
        r = client.post("/generate", json={**ask, "task_id": task})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
    assert ops.get("/ready").status_code == 200

    # Streams left within their first tokens, one after another as the row frees: none keeps its row.
    for i in range(4):
        body = {**ask, "task_id": "alpha", "prompt": f"s{i}", "max_new_tokens": LONG, "stream": True}
        with acme.stream("POST", "/generate", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break
    wait_for(ops, queue=0, running=0, timeout_s=10)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, serverproc.tail(log)
    assert "Traceback" not in serverproc.tail(log, 1 << 20), serverproc.tail(log)
