"""Slow and idle clients against the real server process (tiny model, bounds lowered by flags): a body sent
a byte at a time gets 408 within --body-timeout-s, a head sent so gets 408 within --header-timeout-s,
300 idle sockets are shed past --max-connections and closed within the head deadline, idle keep-alive
connections within --keep-alive-s; a normal client is served all along. Past --max-connections with every
connection running a request, a new one gets 503."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from conftest import byte_tokenizer, make_tiny_model
from starlette.requests import Request
from starlette.responses import StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loadtest import serverproc
from server.api.limits import BodyTimeout

KEEP_ALIVE_S, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, MAX_CONNECTIONS = 1.0, 2.0, 2.0, 250
SLACK_S = 4.0  # the 2 shared cores of CI: a deadline fires on a busy event loop
ASK = {"prompt": "hello there", "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow-clients")
    make_tiny_model("llama-gqa").save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    flags = {
        "model": root / "model",
        "prefix-dir": root / "prefixes",
        "max-batch-size": 4,
        "max-prompt-tokens": 64,
        "max-new-tokens": 16,
        "keep-alive-s": KEEP_ALIVE_S,
        "header-timeout-s": HEADER_TIMEOUT_S,
        "body-timeout-s": BODY_TIMEOUT_S,
        "max-connections": MAX_CONNECTIONS,
    }
    args = [f"--{k}={v}" for k, v in flags.items()]
    with (
        open(root / "server.log", "w+") as log,
        serverproc.running(args, log=log, timeout_s=120) as (_, base),
    ):
        yield base


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes the connection, and when it closed (None: still open)."""
    sock.settimeout(0.2)
    data, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    return data, None


def error_code(raw: bytes) -> str:
    return json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"]


def slowloris(base: str, head: bytes, trickle: bytes, out: dict) -> None:
    """Send `head`, then `trickle` a byte each 0.25 s until the server answers or closes."""
    sock, started = connect(base), time.monotonic()
    sock.sendall(head)
    sock.settimeout(0.25)
    data = b""
    for byte in trickle:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            break  # an answer: read the rest below
        except TimeoutError:
            pass
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    rest, closed_at = read_until_closed(sock, timeout_s=30)
    out.update(
        data=data + rest, seconds=(closed_at or time.monotonic()) - started, closed=closed_at is not None
    )
    sock.close()


def test_slow_body_and_slow_head_get_408_while_a_normal_client_is_served(server):
    body = json.dumps(ASK).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    attackers = [({}, head, body) for _ in range(20)]  # a byte of the body each 0.25 s
    attackers += [({}, b"GET /health HTTP/1.1\r\n", b"x-slow: " + b"a" * 200) for _ in range(5)]
    form = b'--xx\r\ncontent-disposition: form-data; name="task_id"\r\n\r\nslow\r\n--xx--\r\n' * 4
    upload = (
        f"POST /prefixes HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=xx\r\n"
        f"content-length: {len(form)}\r\n\r\n"
    ).encode()
    attackers += [({}, upload, form) for _ in range(3)]  # an upload's form, a byte each 0.25 s
    threads = [threading.Thread(target=slowloris, args=(server, *a[1:], a[0])) for a in attackers]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every attacker is connected and trickling
    started = time.monotonic()
    resp = httpx.post(server + "/generate", json=ASK, timeout=60)
    served_s = time.monotonic() - started
    for t in threads:
        t.join(timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8
    for out, head_sent, _ in attackers:
        assert out["data"].startswith(b"HTTP/1.1 408 "), out["data"][:200]
        assert error_code(out["data"]) == "request_timeout"
        assert out["closed"], "the connection stays open after the 408"
        bound = BODY_TIMEOUT_S if head_sent.startswith(b"POST") else HEADER_TIMEOUT_S
        assert bound - 0.5 < out["seconds"] < bound + SLACK_S
    assert served_s < min(out["seconds"] for out, _, _ in attackers), "the normal client waited for them"


def test_idle_sockets_are_shed_and_closed_while_a_normal_client_is_served(server):
    # 300 sockets: 100 send nothing, 100 part of a request line, 100 one whole request then stay idle.
    opened = time.monotonic()
    silent = [connect(server) for _ in range(100)]
    partial = [connect(server) for _ in range(100)]
    for sock in partial:
        sock.sendall(b"GET /hea")
    idle = [connect(server) for _ in range(100)]
    for sock in idle:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")

    results = {}

    def watch(name: str, sock: socket.socket) -> None:
        results[name] = read_until_closed(sock, timeout_s=HEADER_TIMEOUT_S + 2 * SLACK_S)

    groups = {"silent": silent, "partial": partial, "idle": idle}
    watchers = [
        threading.Thread(target=watch, args=(f"{group}-{i}", sock))
        for group, socks in groups.items()
        for i, sock in enumerate(socks)
    ]
    for t in watchers:
        t.start()
    resp = httpx.post(server + "/generate", json=ASK, timeout=60)  # served while they are open
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8
    for t in watchers:
        t.join()
    for socks in groups.values():
        for sock in socks:
            sock.close()

    assert all(closed_at is not None for _, closed_at in results.values()), "a socket is still open"
    seconds = {name: closed_at - opened for name, (_, closed_at) in results.items()}
    for i in range(100):
        data = results[f"idle-{i}"][0]
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]  # its request was answered, then it idled
        assert seconds[f"idle-{i}"] < KEEP_ALIVE_S + SLACK_S
        assert seconds[f"partial-{i}"] < HEADER_TIMEOUT_S + SLACK_S
        assert seconds[f"silent-{i}"] < HEADER_TIMEOUT_S + SLACK_S
    # Past --max-connections the oldest waiting sockets (the silent ones) were closed at once, with nothing
    # sent; the rest that sent part of a request line got 408 at the deadline.
    shed = [i for i in range(100) if seconds[f"silent-{i}"] < HEADER_TIMEOUT_S - 0.5]
    assert len(shed) >= 300 + 1 - MAX_CONNECTIONS
    assert all(results[f"silent-{i}"][0] == b"" for i in range(100))
    timed_out = [results[f"partial-{i}"][0] for i in range(100)]
    assert all(data == b"" or error_code(data) == "request_timeout" for data in timed_out)
    assert any(data.startswith(b"HTTP/1.1 408 ") for data in timed_out)


PARSERS = {"httptools": HttpToolsProtocol, "h11": H11Protocol}  # uvicorn's, the first if installed


@contextlib.contextmanager
def uvicorn_in_thread(app, header_timeout_s: float, max_connections: int, parser: str = "httptools"):
    """No model: uvicorn in this process with the guarded protocol, serving `app`; yields its base url."""
    import uvicorn

    from server.api.connections import guarded_protocol

    port = serverproc.free_port()
    http = guarded_protocol(header_timeout_s, max_connections, PARSERS[parser])
    uv = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None, http=http, lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("parser", list(PARSERS))
def test_in_either_parser_a_partial_head_gets_408_and_the_oldest_waiting_is_shed(parser):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with uvicorn_in_thread(app, header_timeout_s=1.0, max_connections=3, parser=parser) as base:
        silent, partial = connect(base), connect(base)
        partial.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        answered = connect(base)
        answered.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(0.3)
        newest = connect(base)  # the 4th: the oldest one waiting for its head (silent) is closed
        data, closed_at = read_until_closed(silent, timeout_s=0.4)  # before its own deadline (1 s)
        assert closed_at is not None and data == b""
        data, closed_at = read_until_closed(partial, timeout_s=5)
        assert closed_at is not None and error_code(data) == "request_timeout"
        data, closed_at = read_until_closed(answered, timeout_s=5)  # answered, then its next head is late
        assert closed_at is not None and data.startswith(b"HTTP/1.1 204 ")
        assert read_until_closed(newest, timeout_s=5)[1] is not None
        for sock in (silent, partial, answered, newest):
            sock.close()


@pytest.mark.parametrize("parser", list(PARSERS))
def test_past_max_connections_with_every_one_busy_a_new_connection_gets_503(parser):
    release = threading.Event()

    async def app(scope, receive, send):
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    try:
        with uvicorn_in_thread(app, header_timeout_s=30, max_connections=2, parser=parser) as base:
            busy = [connect(base) for _ in range(2)]
            for sock in busy:
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.3)  # both requests are running
            refused, closed_at = read_until_closed(connect(base), timeout_s=5)
            assert closed_at is not None and refused.startswith(b"HTTP/1.1 503 "), refused[:200]
            assert error_code(refused) == "overloaded" and b"retry-after: 1" in refused
            release.set()
            for sock in busy:  # the running requests were not disturbed
                sock.settimeout(10)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                sock.close()
    finally:
        release.set()


@pytest.mark.parametrize("parser", list(PARSERS))
def test_a_reply_longer_than_the_deadlines_is_not_cut(parser):
    """A 3 s streamed reply (after a whole body) under 1 s head and body deadlines, then a second request
    on the same keep-alive connection."""

    async def ticks():
        for _ in range(6):
            await asyncio.sleep(0.5)
            yield b"tick\n"

    async def app(scope, receive, send):
        await Request(scope, receive).body()
        await StreamingResponse(ticks())(scope, receive, send)  # it also listens for a disconnect

    guarded = BodyTimeout(app, timeout_s=1.0)
    with (
        uvicorn_in_thread(guarded, header_timeout_s=1.0, max_connections=10, parser=parser) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for _ in range(2):
            with client.stream("POST", "/", content=b"x" * 1000) as resp:
                assert resp.status_code == 200 and list(resp.iter_lines()) == ["tick"] * 6
