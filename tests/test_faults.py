"""Faults. The real server process SIGKILLed in the middle of an upload (while the body streams in, while
the temp file is written, between the file and its commit marker, after the commit, and at random times
under a stream of uploads), then restarted on the same store: it serves every committed prefix, with
its version, sha256 and output, and no partial one. Hot swaps under load: every reply names a version
that existed and carries that version's output. A stored prefix that fails to load fails its own
request only, never the engine or the rest of the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from conftest import app_client, byte_tokenizer, make_tiny_model, save_model_folder, tiny_app

from loadtest import serverproc
from server.engine.engine import Engine
from server.registry.format import PrefixKV, save_native, to_peft
from server.request import Request, SamplingParams

REPO = Path(__file__).resolve().parent.parent
FAMILY = "llama-gqa"
PROMPT = "hello there"
MAX_NEW = 6


@pytest.fixture(scope="module")
def engine():
    """The reference: the same tiny model in this process."""
    return Engine(make_tiny_model(FAMILY), byte_tokenizer(), max_rows=8)


def make_prefix(engine: Engine, num_virtual_tokens: int, seed: int) -> PrefixKV:
    """The K/V of random text: prefixes that lead the tiny model to visibly different outputs."""
    gen = torch.Generator().manual_seed(seed)
    return engine.encode_prefix(torch.randint(2, 250, (num_virtual_tokens,), generator=gen).tolist())


def reference_output(engine: Engine, prefix: PrefixKV | None) -> list[int]:
    """Greedy tokens for PROMPT after `prefix`, the request alone on the in-process engine."""
    ids = engine.tokenizer(PROMPT)["input_ids"]
    request = Request(ids, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), prefix=prefix)
    return engine.generate([request])[0].output_token_ids


def ask(task_id: str | None) -> dict:
    return {"task_id": task_id, "prompt": PROMPT, "max_new_tokens": MAX_NEW, "ignore_eos": True}


# ---- the real process, with pause points for deterministic kills inside the registry write ----

# Run as the server's main module: wraps two store functions so that the test can arm a pause point for
# the next N uploads (writing "point N" to FAULT_ARM) and SIGKILL the process once they are all there
# (a line each in FAULT_REACHED).
HOOK = textwrap.dedent(
    r"""
    import os, sys, tempfile, threading, time
    from pathlib import Path

    import server.registry.folder_store as store

    ARM, REACHED = Path(os.environ["FAULT_ARM"]), Path(os.environ["FAULT_REACHED"])
    write_atomic, unlink_versions = store._write_atomic, store._unlink_versions

    LOCK = threading.Lock()  # uploads of different tasks write in parallel threads

    def armed(point):
        with LOCK:
            if not ARM.exists() or ARM.read_text().split()[0] != point:
                return False
            left = int(ARM.read_text().split()[1]) - 1
            ARM.write_text(f"{point} {left}") if left else ARM.unlink()
            return True

    def pause(where):
        with LOCK, REACHED.open("a") as f:
            f.write(where + "\n")
        time.sleep(3600)  # until SIGKILL

    def hooked_write_atomic(path, data):
        if path.name.startswith("v") and path.suffix == ".safetensors" and armed("mid_temp_file"):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            pause(tmp)
        if path.name.startswith("v") and path.suffix == ".json" and armed("before_commit"):
            pause(str(path))  # the .safetensors is in place, its commit marker is not
        write_atomic(path, data)

    def hooked_unlink_versions(folder, versions):
        if armed("after_commit"):
            pause(str(folder))  # committed; the old versions' files and the reply are not done
        unlink_versions(folder, versions)

    store._write_atomic, store._unlink_versions = hooked_write_atomic, hooked_unlink_versions
    from server.cli import main

    main(sys.argv[1:])
    """
)


@dataclass
class Server:
    """The server process on the tiny model saved in `model_dir`, on the store `prefix_dir`."""

    model_dir: Path
    prefix_dir: Path
    work: Path
    proc: subprocess.Popen | None = None
    base: str = ""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.work / "server.log"
        (self.work / "hook.py").write_text(HOOK)

    def start(self) -> None:
        port = serverproc.free_port()
        self.base = f"http://127.0.0.1:{port}"
        flags = {
            "model": self.model_dir,
            "prefix-dir": self.prefix_dir,
            "port": port,
            "max-batch-size": 4,
            "max-batch-wait-ms": 1,
            "max-virtual-tokens": 8192,  # the big upload below is a valid prefix, were it complete
            "max-upload-bytes": 8 << 20,
            "max-prompt-tokens": 64,
            "max-new-tokens": 16,
        }
        argv = ["serve", *(f"--{k}={v}" for k, v in flags.items())]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "FAULT_ARM": str(self.work / "arm"),
            "FAULT_REACHED": str(self.work / "reached"),
        }
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.work / "hook.py"), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.tail()}"
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"server not ready in 120 s: {self.tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def arm(self, point: str, count: int) -> None:
        """The next `count` uploads stop at `point` (see HOOK)."""
        (self.work / "reached").unlink(missing_ok=True)
        (self.work / "arm").write_text(f"{point} {count}")

    def wait_reached(self, count: int, timeout: float = 30) -> None:
        reached = self.work / "reached"
        deadline = time.monotonic() + timeout
        while not reached.exists() or len(reached.read_text().splitlines()) < count:
            assert time.monotonic() < deadline, f"pause point not reached: {self.tail()}"
            time.sleep(0.01)
        time.sleep(0.05)  # the hook wrote its line and went to sleep

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, engine) -> Path:
    """The reference model and tokenizer saved as a Hugging Face folder: the server starts in seconds."""
    return save_model_folder(engine, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def server(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "prefixes", tmp_path)
    yield srv
    srv.kill()


def upload_bytes(
    client: httpx.Client, task_id: str, data: bytes, config: bytes | None = None
) -> httpx.Response:
    files = {"file": ("adapter_model.safetensors", data)}
    if config is not None:
        files["config"] = ("adapter_config.json", config)
    return client.post("/prefixes", data={"task_id": task_id}, files=files)


@dataclass
class Committed:
    """What the client was told about a version (201), and the prefix it sent."""

    version: int
    sha256: str
    prefix: PrefixKV


def check_store_on_disk(prefix_dir: Path) -> None:
    """Right after a kill: temp files may be left, but every commit marker (v<N>.json) has its whole file."""
    for marker in (prefix_dir / "tasks").glob("*/v*.json"):
        record = json.loads(marker.read_bytes())
        data = marker.with_suffix(".safetensors").read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["bytes"], record["sha256"]), marker


def check_serves(
    srv: Server, engine: Engine, committed: dict[str, Committed], in_flight: dict[str, PrefixKV] | None = None
) -> dict[str, int]:
    """After a restart: exactly the committed prefixes are listed and served, with their version, sha256 and
    output. A task with an upload in flight at the kill may show that upload instead, as a later version,
    whole (its output), since the kill may come after the commit and before the reply."""
    in_flight = in_flight or {}
    assert not list(srv.prefix_dir.glob("tasks/*/.*.tmp")), "recovery removes leftover temp files"
    with srv.client() as client:
        listed = {p["task_id"]: p for p in client.get("/prefixes").json()["prefixes"]}
        assert set(listed) <= set(committed) | set(in_flight), listed
        versions = {}
        for task_id in set(committed) | set(in_flight):
            reply = client.post("/generate", json=ask(task_id))
            if task_id not in listed:
                assert task_id not in committed, f"committed task {task_id} lost: {srv.tail()}"
                assert reply.status_code == 404, reply.text
                continue
            info, out = listed[task_id], reply.json()
            assert reply.status_code == 200 and out["prefix_version"] == info["version"], reply.text
            acked = committed.get(task_id)
            if acked is not None and info["version"] == acked.version:
                assert info["sha256"] == acked.sha256
                assert out["token_ids"] == reference_output(engine, acked.prefix)
            else:
                assert task_id in in_flight and info["version"] > (acked.version if acked else 0), info
                assert info["num_virtual_tokens"] == in_flight[task_id].num_virtual_tokens
                assert out["token_ids"] == reference_output(engine, in_flight[task_id])
            versions[task_id] = info["version"]
    return versions


def commit(client: httpx.Client, committed: dict[str, Committed], task_id: str, prefix: PrefixKV) -> None:
    resp = upload_bytes(client, task_id, save_native(prefix))
    assert resp.status_code == 201, resp.text
    committed[task_id] = Committed(resp.json()["version"], resp.json()["sha256"], prefix)


def send_partial_upload(
    base: str, task_id: str, data: bytes, config: bytes, fraction: float
) -> socket.socket:
    """Send the headers and the first `fraction` of a multipart upload's body over a raw socket; the
    rest never comes. Returns the open socket."""
    request = httpx.Request(
        "POST",
        base + "/prefixes",
        data={"task_id": task_id},
        files={"file": ("adapter_model.safetensors", data), "config": ("adapter_config.json", config)},
    )
    body = request.read()
    host, port = request.url.host, request.url.port
    head = f"POST /prefixes HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host") + "\r\n"
    sock = socket.create_connection((host, port))
    sock.sendall(head.encode())
    sent = int(len(body) * fraction)
    for start in range(0, sent, 1 << 16):  # slowly, so the server is reading it
        sock.sendall(body[start : min(sent, start + (1 << 16))])
        time.sleep(0.002)
    return sock


class Uploader(threading.Thread):
    """Uploads `prefixes` to one task, one after another, until they run out, `stop` is set or the server
    dies; `committed` gets each acknowledged version, `in_flight` the prefix of an unanswered upload."""

    def __init__(
        self, base: str, task_id: str, prefixes, committed: dict, stop: threading.Event | None = None
    ):
        super().__init__()
        self.base, self.task_id, self.prefixes = base, task_id, prefixes
        self.committed, self.stop = committed, stop or threading.Event()
        self.in_flight: PrefixKV | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base, timeout=60) as client:
                for prefix in self.prefixes:
                    self.in_flight = prefix
                    try:
                        resp = upload_bytes(client, self.task_id, save_native(prefix))
                    except httpx.TransportError:
                        return  # the server was killed: the upload stays in flight
                    assert resp.status_code == 201, resp.text
                    info = resp.json()
                    self.committed[self.task_id] = Committed(info["version"], info["sha256"], prefix)
                    self.in_flight = None
                    if self.stop.is_set():
                        return
        except BaseException as e:
            self.error = e


def adopt_in_flight(srv: Server, committed: dict[str, Committed], in_flight: dict[str, PrefixKV]) -> None:
    """An upload in flight at the kill that turned out committed counts as committed from now on."""
    with srv.client() as client:
        for task_id, prefix in in_flight.items():
            info = client.get(f"/prefixes/{task_id}").json()
            if "version" in info and info["version"] != getattr(committed.get(task_id), "version", None):
                committed[task_id] = Committed(info["version"], info["sha256"], prefix)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_every_stage_of_an_upload_then_restart(server, engine):
    """Rounds on one store; each kills the server at one stage of an upload, restarts it and checks that
    exactly the committed prefixes are served."""
    committed: dict[str, Committed] = {}
    server.start()
    with server.client() as client:
        for i, task_id in enumerate(["alpha", "beta", "gamma", "alpha"]):  # alpha gets two versions
            commit(client, committed, task_id, make_prefix(engine, 3 + i, seed=i))
    assert committed["alpha"].version == 2

    # 1. While the body streams in: a 4 MiB PEFT upload (8192 virtual tokens), 60% sent, then SIGKILL.
    keys, values = torch.randn(2, 2, 2, 8192, 16).mul(0.1).unbind(0)  # each [L, kv, P, D]
    big, config = to_peft(PrefixKV(keys, values, engine.fingerprint))
    assert len(big) >= 4 << 20
    sock = send_partial_upload(server.base, "beta", big, json.dumps(config).encode(), fraction=0.6)
    time.sleep(0.3)
    server.kill()
    sock.close()
    check_store_on_disk(server.prefix_dir)
    server.start()
    check_serves(server, engine, committed)

    # 2.-5. Inside the registry write, deterministically: one upload stops at a pause point, a second one
    # (another task) queues behind it (uploads are serialized per tenant), then SIGKILL.
    rounds = [
        ("mid_temp_file", "new-0"),
        ("before_commit", "gamma"),
        ("before_commit", "new-1"),
        ("after_commit", "gamma"),
    ]
    for n, (point, task_id) in enumerate(rounds):
        paused = Uploader(server.base, task_id, [make_prefix(engine, 4 + n, seed=100 + n)], committed={})
        queued = Uploader(server.base, f"queued-{n}", [make_prefix(engine, 2, seed=200 + n)], committed={})
        server.arm(point, 1)
        paused.start()
        server.wait_reached(1)
        queued.start()
        time.sleep(0.2)
        server.kill()
        for uploader in (paused, queued):
            uploader.join(timeout=30)
            assert uploader.error is None and uploader.in_flight is not None, "the client got no reply"
        check_store_on_disk(server.prefix_dir)
        server.start()
        # Committed (and so served, whole) only if the kill came after the commit marker.
        in_flight = {task_id: paused.in_flight} if point == "after_commit" else {}
        versions = check_serves(server, engine, committed, in_flight)
        before = getattr(committed.get(task_id), "version", None)
        if point == "after_commit":
            assert versions[task_id] > (before or 0)
        else:
            assert versions.get(task_id) == before
        with server.client() as client:
            assert client.get(f"/prefixes/queued-{n}").status_code == 404
        adopt_in_flight(server, committed, in_flight)

    # Versions only grow: a new upload after all that gets a version above every one issued.
    with server.client() as client:
        before = committed["gamma"].version
        commit(client, committed, "gamma", make_prefix(engine, 5, seed=999))
        assert committed["gamma"].version > before
    check_serves(server, engine, committed)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_times_during_upload_streams(server, engine):
    """Three uploaders, each re-uploading its own task in a loop; SIGKILL at a random moment, three times.
    An upload in flight at the kill may or may not have committed, never half."""
    rng = random.Random(1234)
    committed: dict[str, Committed] = {}
    server.start()
    for round_ in range(3):
        stop = threading.Event()
        uploaders = [
            Uploader(
                server.base,
                task_id,
                [
                    make_prefix(engine, 1 + (k + i) % 12, seed=10_000 * round_ + 1000 * k + i)
                    for i in range(150)
                ],
                committed,
                stop,
            )
            for k, task_id in enumerate(["one", "two", "three"])
        ]
        for uploader in uploaders:
            uploader.start()
        time.sleep(rng.uniform(0.2, 1.0))
        server.kill()
        stop.set()
        for uploader in uploaders:
            uploader.join(timeout=60)
            assert uploader.error is None, uploader.error
        in_flight = {u.task_id: u.in_flight for u in uploaders if u.in_flight is not None}
        check_store_on_disk(server.prefix_dir)
        server.start()
        check_serves(server, engine, committed, in_flight)
        adopt_in_flight(server, committed, in_flight)
    assert all(c.version >= 2 for c in committed.values()), committed


# ---- in process: hot swap under load, and a prefix that fails to load in a forming batch ----


@pytest.mark.timeout(120)  # a scheduler that stops answering must fail the test, not hang it
async def test_hot_swap_under_load(tmp_path, engine):
    """One task re-uploaded 12 times while 8 clients keep asking for it: no errors; every reply names a
    version that existed by then, and carries exactly that version's output."""
    prefixes = {v: make_prefix(engine, 2 + v % 5, seed=500 + v) for v in range(1, 13)}
    expected = {v: reference_output(engine, p) for v, p in prefixes.items()}
    assert len({tuple(t) for t in expected.values()}) >= 6, "the versions must be told apart by output"
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=1.0)
    replies: list[tuple[int, int, dict]] = []  # (newest version before the request, newest after, reply)
    uploaded: list[int] = [0]
    done = asyncio.Event()
    async with app_client(app) as client:

        async def uploader() -> None:
            try:
                for version, prefix in prefixes.items():
                    files = {"file": ("p.safetensors", save_native(prefix))}
                    resp = await client.post("/prefixes", data={"task_id": "swap"}, files=files)
                    assert resp.status_code == 201 and resp.json()["version"] == version, resp.text
                    uploaded.append(version)
                    await asyncio.sleep(0.02)
            finally:
                done.set()

        async def asker() -> None:
            while not done.is_set():
                newest = uploaded[-1]  # its upload returned before this request started
                resp = await client.post("/generate", json=ask("swap"))
                if newest == 0:
                    assert resp.status_code in (200, 404), resp.text
                    continue
                assert resp.status_code == 200, resp.text
                replies.append((newest, uploaded[-1], resp.json()))

        await asyncio.gather(uploader(), *(asker() for _ in range(8)))
    for newest_before, newest_after, reply in replies:
        # At least the version whose upload had returned; at most one whose upload was committing.
        assert newest_before <= reply["prefix_version"] <= newest_after + 1, (
            newest_before,
            newest_after,
            reply,
        )
        assert reply["token_ids"] == expected[reply["prefix_version"]], reply
    assert len(replies) >= 24 and len({r["prefix_version"] for *_, r in replies}) >= 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["flipped", "missing", "unreadable"])
async def test_a_prefix_failing_to_load_fails_its_own_request_only(tmp_path, engine, damage):
    """The stored file of a task is damaged after upload, with the cache cold; a batch forms with that task
    and three others: its request gets a clear error, the other rows their exact outputs, and the engine
    goes on serving."""
    good = {f"good-{i}": make_prefix(engine, 3 + i, seed=700 + i) for i in range(3)}
    expected = {task_id: reference_output(engine, prefix) for task_id, prefix in good.items()}
    expected[None] = reference_output(engine, None)
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=300.0)
    async with app_client(app) as client:
        for task_id, prefix in {**good, "bad": make_prefix(engine, 4, seed=799)}.items():
            files = {"file": ("p.safetensors", save_native(prefix))}
            assert (await client.post("/prefixes", data={"task_id": task_id}, files=files)).status_code == 201
        assert ("bad", 1) not in app.state.server.components.registry.cache  # cold: loaded from disk
        stored = client.root / "tasks" / "bad" / "v1.safetensors"
        if damage == "flipped":
            data = bytearray(stored.read_bytes())
            data[-3] ^= 0x40  # inside the tensor data: the sha256 no longer matches
            stored.write_bytes(bytes(data))
        elif damage == "missing":
            stored.unlink()
        else:
            stored.unlink()
            stored.mkdir()  # reading it raises IsADirectoryError, an OSError of another kind

        scheduler = app.state.server.scheduler
        steps_before = len(scheduler.batch_sizes)
        bodies = [ask("bad"), *(ask(t) for t in good), ask(None)]
        replies = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        bad, *rest = replies
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error", bad.text
        assert "'bad'" in bad.json()["error"]["message"], bad.text
        for task_id, reply in zip([*good, None], rest, strict=True):
            assert reply.status_code == 200, reply.text
            assert reply.json()["token_ids"] == expected[task_id]
        assert max(list(scheduler.batch_sizes)[steps_before:]) == 4  # the other rows shared one batch
        again = await client.post("/generate", json=ask("good-0"))
        assert again.status_code == 200 and again.json()["token_ids"] == expected["good-0"]


@pytest.mark.timeout(120)
async def test_a_prefix_of_extreme_values_breaks_no_other_row(tmp_path, engine):
    """Values near float32's largest (finite, so accepted) overflow attention into NaN logits. A sampled
    row with that prefix once failed the whole batch (NaN probabilities); now it gets the greedy token,
    and the other rows of the batch, other tenants' included, their exact outputs."""
    fp = engine.fingerprint
    huge = torch.full((fp.num_layers, fp.kv_heads, 3, fp.head_dim), 3e38)  # [L, kv, P, D]
    good = make_prefix(engine, 4, seed=800)
    expected = {"good": reference_output(engine, good), None: reference_output(engine, None)}
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=300.0)
    async with app_client(app) as client:
        for task_id, prefix in {"huge": PrefixKV(huge, huge.clone(), fp), "good": good}.items():
            files = {"file": ("p.safetensors", save_native(prefix))}
            assert (await client.post("/prefixes", data={"task_id": task_id}, files=files)).status_code == 201
        sampled = {**ask("huge"), "temperature": 1.0, "seed": 3}
        replies = await asyncio.gather(
            *(client.post("/generate", json=b) for b in (sampled, ask("huge"), ask("good"), ask(None)))
        )
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert replies[2].json()["token_ids"] == expected["good"]
        assert replies[3].json()["token_ids"] == expected[None]
