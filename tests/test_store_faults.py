"""Faults below HTTP in the prefix store, against the real server process on a tiny model: the store's disk
fills up during an upload, the store turns read-only, the S3 endpoint goes away and comes back. Each
checks: nothing lost, a clear error (never a 500), and recovery without a restart.

How each fault is made, the real store code running throughout:
- disk full: RLIMIT_FSIZE on the server process (prlimit from the test), so the kernel cuts the write of
  the prefix file part way with EFBIG, exactly where a full disk gives ENOSPC; the in-process test below
  raises ENOSPC and the other errnos at the same place.
- read-only: a launcher makes every write system call under the store folder (open for writing, mkdir,
  rename, unlink, rmdir) fail with EROFS or EACCES while a marker file exists, as a read-only mount or a
  chmod would (these tests run as root too, where a chmod changes nothing); reads are untouched.
- S3: moto's S3 server behind a TCP forwarder the test takes down (connections refused, open ones cut)
  and brings back on the same port, or turns into a black hole (accepts, never answers).
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import resource
import socket
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    byte_tokenizer,
    make_tiny_model,
    native_bytes,
    put_prefix,
    save_model_folder,
    use_s3_endpoint,
)

from loadtest import serverproc
from server.engine.engine import Engine
from server.errors import InsufficientStorage, PrefixNotFound, StoreReadOnly, StoreUnavailable
from server.registry.folder_store import FolderStore
from server.registry.format import PrefixKV, save_native
from server.registry.s3_bucket import CALL_BOUND_S, PROBE_INTERVAL_S, TaskObjects
from server.registry.s3_store import S3PrefixStore
from server.registry.shared_store import SharedFolderStore
from server.request import Request, SamplingParams

PROMPT = "hello there"
MAX_NEW = 6


@pytest.fixture(scope="module")
def engine():
    """The reference: the server's tiny model, in this process."""
    return Engine(make_tiny_model("llama-gqa"), byte_tokenizer(), max_rows=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, engine) -> Path:
    return save_model_folder(engine, tmp_path_factory.mktemp("tiny-model"))


def make_prefix(engine: Engine, num_virtual_tokens: int, seed: int) -> PrefixKV:
    gen = torch.Generator().manual_seed(seed)
    return engine.encode_prefix(torch.randint(2, 250, (num_virtual_tokens,), generator=gen).tolist())


def reference_output(engine: Engine, prefix: PrefixKV) -> list[int]:
    ids = engine.tokenizer(PROMPT)["input_ids"]
    request = Request(ids, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), prefix=prefix)
    return engine.generate([request])[0].output_token_ids


def generate(client: httpx.Client, task_id: str) -> httpx.Response:
    body = {"task_id": task_id, "prompt": PROMPT, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    return client.post("/generate", json=body)


def upload(client: httpx.Client, task_id: str, prefix: PrefixKV) -> httpx.Response:
    files = {"file": ("prefix.safetensors", save_native(prefix))}
    return client.post("/prefixes", data={"task_id": task_id}, files=files)


def error_of(reply: httpx.Response, status: int, code: str) -> str:
    """The message of a JSON error reply with this status and code."""
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code, reply.text
    return reply.json()["error"]["message"]


def files_under(root: Path) -> dict[str, bytes]:
    """Every file and folder under `root` (folders as b"/"), by relative path."""
    return {
        str(p.relative_to(root)): b"/" if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if "locks" not in p.parts
    }


def start(args: list[str], work: Path) -> tuple:
    """The server on the tiny model, run through LAUNCHER (see below); (process, base url, log)."""
    (work / "launcher.py").write_text(LAUNCHER)
    log = open(work / "server.log", "w+")  # noqa: SIM115 (closed by stop_server)
    try:
        proc, base = serverproc.start(
            [*args, "--max-batch-wait-ms", "1", "--max-virtual-tokens", "512"],
            log=log,
            timeout_s=120,
            launcher=[sys.executable, str(work / "launcher.py")],
        )
    except serverproc.ServerNotReady as e:
        log.close()
        pytest.fail(str(e))
    return proc, base, log


def stop_server(proc, log) -> None:
    try:
        serverproc.stop(proc)
    finally:
        log.close()


def refusing_writes(root, code_now):
    """Replacements for os functions: a write under the folder `root` (open for writing, mkdir, rmdir,
    unlink, remove, replace, rename) fails with errno `code_now()` unless that is None; the rest, and
    every read, run as usual. Self-contained: LAUNCHER runs its source in the server process."""
    import os

    root = os.path.abspath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(path):
        path = os.path.abspath(os.fsdecode(path))
        code = code_now() if path == root or path.startswith(root + os.sep) else None
        if code is not None:
            raise OSError(code, os.strerror(code), path)

    def guarded(call, num_paths):
        def wrapper(*args, **kwargs):
            for path in args[:num_paths]:
                refuse(path)
            return call(*args, **kwargs)

        return wrapper

    def guarded_open(path, flags, *args, real_open=os.open, **kwargs):
        if flags & write_flags:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    paths = {"mkdir": 1, "rmdir": 1, "unlink": 1, "remove": 1, "replace": 2, "rename": 2}
    return {"open": guarded_open} | {name: guarded(getattr(os, name), n) for name, n in paths.items()}


# Runs the server (`python launcher.py serve ...`): a write past RLIMIT_FSIZE fails with EFBIG instead of
# killing the process, and while the file $STORE_READ_ONLY exists (it holds an errno name, EROFS, ...),
# every write under $STORE_ROOT fails with that errno.
LAUNCHER = inspect.getsource(refusing_writes) + textwrap.dedent(
    r"""
    import errno, os, signal, sys

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    MARKER = os.environ.get("STORE_READ_ONLY")

    def code_now():
        if os.path.exists(MARKER):
            with open(MARKER) as f:
                return getattr(errno, f.read().strip())
        return None

    if MARKER:
        for name, call in refusing_writes(os.environ["STORE_ROOT"], code_now).items():
            setattr(os, name, call)

    from server.cli import main

    main(sys.argv[1:])
    """
)


# ---- 1. the disk fills up during an upload ----


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_disk_full_during_upload_is_a_507_and_leaves_the_store_as_it_was(engine, model_dir, tmp_path):
    root = tmp_path / "prefixes"
    proc, base, log = start(["--model", str(model_dir), "--prefix-dir", str(root)], tmp_path)
    small, big, other = make_prefix(engine, 8, 1), make_prefix(engine, 256, 2), make_prefix(engine, 256, 3)
    limit = 64 << 10  # the 256-token prefixes' files are 128 KiB; the log and the .json stay far below
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            assert upload(client, "kept", small).json()["version"] == 1
            before = generate(client, "kept").json()
            assert before["token_ids"] == reference_output(engine, small)
            listed, on_disk = client.get("/prefixes").json(), files_under(root)

            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            for task_id, prefix in (("kept", big), ("new", other)):  # a new version, a new task
                message = error_of(upload(client, task_id, prefix), 507, "insufficient_storage")
                assert "out of space" in message and "was not stored" in message, message
            assert client.get("/prefixes").json() == listed
            assert files_under(root) == on_disk  # no temp file, no half version, no empty folder
            assert generate(client, "kept").json()["token_ids"] == before["token_ids"]

            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            assert upload(client, "kept", big).json()["version"] == 2  # the failed upload burnt no version
            assert upload(client, "new", other).json()["version"] == 1
            for task_id, prefix in (("kept", big), ("new", other)):
                reply = generate(client, task_id).json()
                assert reply["token_ids"] == reference_output(engine, prefix), reply
        assert proc.poll() is None and "Traceback" not in serverproc.tail(log, 1 << 20)
    finally:
        stop_server(proc, log)


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES"])
def test_a_failed_write_is_undone_and_named(tmp_path, monkeypatch, code):
    """In process: the write of a version's file fails with `code` (at the rename: its temp file exists)."""
    store = FolderStore(tmp_path)
    store.recover()
    v1 = put_prefix(store, "kept", seed=1)
    on_disk = files_under(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    expected = StoreReadOnly if code in ("EROFS", "EACCES") else InsufficientStorage
    for task_id in ("kept", "new"):
        with pytest.raises(expected, match="not writable" if expected is StoreReadOnly else "out of space"):
            put_prefix(store, task_id, seed=2)
    with pytest.raises(expected):
        store.delete("kept")
    assert files_under(tmp_path) == on_disk and store.list() == [v1]
    monkeypatch.setattr(os, "replace", real_replace)
    assert put_prefix(store, "kept", seed=2).version == 2 and put_prefix(store, "new", seed=3).version == 1
    assert store.read(store.get("kept")) == native_bytes(2)


# ---- 2. the store turns read-only ----


def refuse_writes(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """In process, as LAUNCHER does in the server: every write under `root` fails with `code`."""
    for name, call in refusing_writes(str(root), lambda: code).items():
        monkeypatch.setattr(os, name, call)


@pytest.mark.parametrize("shared", [False, True], ids=["folder", "shared-folder"])
def test_a_read_only_store_recovers_and_serves_and_refuses_writes(tmp_path, monkeypatch, shared):
    """A restart on a store that turned read-only with leftovers in it (a temp file, a superseded version):
    recovery reads it all, cleans what it can (nothing), serves the same; writes are a StoreReadOnly."""
    make = (lambda: SharedFolderStore(tmp_path)) if shared else (lambda: FolderStore(tmp_path))
    store = make()
    store.recover()
    put_prefix(store, "t", seed=1)
    v2 = put_prefix(store, "t", seed=2)
    folder = tmp_path / "tasks" / "t"
    (folder / "v1.safetensors").write_bytes(native_bytes(1))  # as if the post-commit cleanup was cut short
    (folder / ".v3.safetensors.x.tmp").write_bytes(b"half")  # as if an upload was killed
    on_disk = files_under(tmp_path)
    refuse_writes(monkeypatch, tmp_path)
    store = make()
    warnings = store.recover()
    if not shared:  # (the shared store cannot take its lock file, so it does not even try to clean)
        assert any("left temp file" in w for w in warnings) and any(
            "left old versions" in w for w in warnings
        )
    assert store.list() == [v2] and store.read(v2) == native_bytes(2)
    with pytest.raises(StoreReadOnly, match="not writable"):
        put_prefix(store, "t", seed=3)
    with pytest.raises(StoreReadOnly, match="not writable"):
        put_prefix(store, "new", seed=3)
    with pytest.raises(StoreReadOnly, match="not writable"):
        store.delete("t")
    assert files_under(tmp_path) == on_disk and store.get("t") == v2
    monkeypatch.undo()
    assert put_prefix(store, "t", seed=3).version == 3


def test_read_only_store_refuses_writes_with_503_and_generation_goes_on(
    engine, model_dir, tmp_path, monkeypatch
):
    root, marker = tmp_path / "prefixes", tmp_path / "read-only"
    monkeypatch.setenv("STORE_ROOT", str(root))
    monkeypatch.setenv("STORE_READ_ONLY", str(marker))
    proc, base, log = start(["--model", str(model_dir), "--prefix-dir", str(root)], tmp_path)
    prefixes = {
        task_id: make_prefix(engine, 8, seed) for seed, task_id in enumerate(["hot", "cold1", "cold2"])
    }
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for task_id, prefix in prefixes.items():
                assert upload(client, task_id, prefix).status_code == 201
            hot = generate(client, "hot").json()["token_ids"]  # now resident; cold1 and cold2 are not
            listed, on_disk = client.get("/prefixes").json(), files_under(root)
            for name, cold in (("EROFS", "cold1"), ("EACCES", "cold2")):
                marker.write_text(name)
                refused = [
                    upload(client, "hot", prefixes["cold1"]),
                    upload(client, "new", prefixes["cold1"]),
                    client.post("/prefixes/from-text", json={"task_id": "new", "text": "be brief"}),
                    client.delete("/prefixes/hot"),
                ]
                for reply in refused:
                    assert "not writable" in error_of(reply, 503, "store_read_only"), name
                    assert reply.headers["Retry-After"] == "1"
                assert generate(client, "hot").json()["token_ids"] == hot
                cold_reply = generate(client, cold)  # read from the read-only disk now
                assert cold_reply.json()["token_ids"] == reference_output(engine, prefixes[cold]), (
                    cold_reply.text
                )
                assert client.get("/prefixes").json() == listed
                assert files_under(root) == on_disk
            marker.unlink()
            assert upload(client, "hot", prefixes["cold1"]).json()["version"] == 2
            assert client.delete("/prefixes/cold2").status_code == 204
            assert generate(client, "hot").json()["token_ids"] == reference_output(engine, prefixes["cold1"])
        assert proc.poll() is None and "Traceback" not in serverproc.tail(log, 1 << 20)
    finally:
        stop_server(proc, log)


# ---- 3. the S3 endpoint goes away and comes back ----


class Forwarder:
    """TCP from a fixed localhost port to `target`: `down()` stops listening (new connections are refused)
    and cuts the open ones, `up()` listens again on the same port, `black_hole()` accepts and never
    answers."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, serverproc.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "down"
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self, mode: str = "up") -> None:
        self.down()
        self.mode = mode
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port
        self._listener.settimeout(0.05)
        self._acceptor = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._acceptor.start()

    def black_hole(self) -> None:
        self.up("black hole")

    def down(self) -> None:
        self.mode = "down"
        if self._listener is not None:
            self._listener.close()
            self._acceptor.join()  # its poll of the listener ends within the 0.05 s timeout: port free
            self._listener = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while listener.fileno() != -1:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            if self.mode == "black hole":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open.add(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _swallow(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 16):
                pass


@pytest.fixture(scope="module")
def moto_endpoint():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    """(the forwarder in front of moto, up, which boto3 in this process and in child processes uses,
    a fresh bucket's s3:// URL, a boto3 client that talks to moto directly)."""
    boto3 = pytest.importorskip("boto3")
    forwarder = Forwarder(moto_endpoint)
    forwarder.up()
    use_s3_endpoint(monkeypatch, forwarder.url, tmp_path)
    direct = boto3.client("s3", endpoint_url="http://{}:{}".format(*moto_endpoint))
    bucket = f"prefixes-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=bucket)
    yield forwarder, f"s3://{bucket}/x", direct
    forwarder.down()


def bucket_keys(direct, url: str) -> list[str]:
    bucket = url.removeprefix("s3://").split("/")[0]
    return sorted(o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", []))


def wait_until(check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "not recovered in time"
        time.sleep(0.1)
    return result


def test_s3_store_outage_in_process(s3):
    """The store alone: known tasks are served from the index, unknown ones and writes are refused at
    once (StoreUnavailable, not "not found"), nothing is written, and it recovers by itself."""
    forwarder, url, direct = s3
    store = S3PrefixStore.from_url(url, ttl_s=0.0)
    store.recover()
    v1 = put_prefix(store, "known", seed=1)
    keys = bucket_keys(direct, url)
    forwarder.down()
    started = time.monotonic()
    assert store.get("known") == v1  # from the index; the failed check is logged once, not raised
    for call in (
        lambda: store.get("other"),
        lambda: store.read(v1),
        lambda: put_prefix(store, "known", seed=2),
        lambda: put_prefix(store, "new", seed=2),
        lambda: store.delete("known"),
    ):
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            call()
    assert store.list() == [v1] and not store.objects.reachable
    assert time.monotonic() - started < CALL_BOUND_S
    forwarder.up()
    wait_until(lambda: store.objects.reachable, 5 * PROBE_INTERVAL_S)
    assert bucket_keys(direct, url) == keys  # no write reached the bucket, nor half of one
    assert store.read(v1) == native_bytes(1)
    assert put_prefix(store, "known", seed=2).version == 2 and put_prefix(store, "new", seed=3).version == 1
    with pytest.raises(PrefixNotFound):
        store.get("other")


def test_s3_outage_mid_traffic_then_back_without_restart(engine, model_dir, tmp_path, s3):
    forwarder, url, direct = s3
    store_args = ["--prefix-store", url, "--prefix-store-ttl-s", "0"]  # every lookup checks the bucket
    proc, base, log = start(["--model", str(model_dir), *store_args], tmp_path)
    prefixes = {task_id: make_prefix(engine, 8, seed) for seed, task_id in enumerate(["hot", "cold", "peer"])}
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for task_id in ("hot", "cold"):
                assert upload(client, task_id, prefixes[task_id]).status_code == 201
            hot = generate(client, "hot").json()["token_ids"]  # resident now; "cold" is indexed, not loaded
            listed = client.get("/prefixes").json()
            peer = S3PrefixStore.from_url(url)  # another server's upload, which this one never looked up
            peer.put("peer", lambda v: save_native(prefixes["peer"]), num_virtual_tokens=8, source="native")
            keys = bucket_keys(direct, url)

            forwarder.down()
            for _ in range(3):
                assert generate(client, "hot").json()["token_ids"] == hot
            for task_id in ("cold", "peer", "never-stored"):  # "not found" would be a guess
                started = time.monotonic()
                reply = generate(client, task_id)
                assert "cannot be reached" in error_of(reply, 503, "store_unavailable"), task_id
                assert reply.headers["Retry-After"] == "1"
                assert time.monotonic() - started < CALL_BOUND_S
            refused = [
                upload(client, "hot", prefixes["peer"]),
                upload(client, "new", prefixes["peer"]),
                client.delete("/prefixes/cold"),
            ]
            for reply in refused:
                error_of(reply, 503, "store_unavailable")
            assert client.get("/prefixes").json() == listed
            assert client.get("/health").status_code == 200

            forwarder.up()
            reply = wait_until(lambda: (r := generate(client, "cold")).status_code == 200 and r)
            assert reply.json()["token_ids"] == reference_output(engine, prefixes["cold"])
            assert bucket_keys(direct, url) == keys  # nothing of the refused writes, not half of one
            peer_reply = generate(client, "peer").json()
            assert peer_reply["token_ids"] == reference_output(engine, prefixes["peer"]), peer_reply
            error_of(generate(client, "never-stored"), 404, "task_not_found")
            assert generate(client, "hot").json()["token_ids"] == hot
            assert upload(client, "hot", prefixes["peer"]).json()["version"] == 2
            assert upload(client, "new", prefixes["peer"]).json()["version"] == 1
        assert proc.poll() is None and "Traceback" not in serverproc.tail(log, 1 << 20)
    finally:
        stop_server(proc, log)


@pytest.mark.slow  # waits out two read timeouts (10 s), then the server start and the recovery
def test_s3_endpoint_that_never_answers_is_a_bounded_503_not_a_hang(engine, model_dir, tmp_path, s3):
    forwarder, url, _ = s3
    proc, base, log = start(["--model", str(model_dir), "--prefix-store", url], tmp_path)
    prefixes = {task_id: make_prefix(engine, 8, seed) for seed, task_id in enumerate(["hot", "cold"])}
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for task_id in ("hot", "cold"):
                assert upload(client, task_id, prefixes[task_id]).status_code == 201
            hot = generate(client, "hot").json()["token_ids"]
            forwarder.black_hole()
            time.sleep(1.1)  # past --prefix-store-ttl-s (1 s): the next lookup asks the bucket
            started = time.monotonic()
            error_of(generate(client, "cold"), 503, "store_unavailable")  # the one call that waits
            assert time.monotonic() - started < CALL_BOUND_S + 2
            started = time.monotonic()
            assert generate(client, "hot").json()["token_ids"] == hot
            error_of(generate(client, "cold"), 503, "store_unavailable")
            error_of(upload(client, "cold", prefixes["hot"]), 503, "store_unavailable")
            assert time.monotonic() - started < 5  # no call waits on a store known to be down
            forwarder.up()
            reply = wait_until(lambda: (r := generate(client, "cold")).status_code == 200 and r)
            assert reply.json()["token_ids"] == reference_output(engine, prefixes["cold"])
        assert proc.poll() is None and "Traceback" not in serverproc.tail(log, 1 << 20)
    finally:
        stop_server(proc, log)


def test_s3_error_replies_are_503_only_when_the_store_is_busy_or_failing():
    """5xx and throttling replies (after botocore's retries) are StoreUnavailable, without marking the
    endpoint down (it answered); other replies (access denied, ...) pass through as they were."""
    exceptions = pytest.importorskip("botocore.exceptions")

    class Client:
        meta = type("Meta", (), {"endpoint_url": "http://store"})

        def __init__(self, code: str) -> None:
            self.code = code

        def head_object(self, **_):
            raise exceptions.ClientError({"Error": {"Code": self.code, "Message": "..."}}, "HeadObject")

    for code in ("SlowDown", "503", "InternalError", "AccessDenied"):
        objects = TaskObjects(Client(code), "s3://bucket/x")
        expected = exceptions.ClientError if code == "AccessDenied" else StoreUnavailable
        with pytest.raises(expected):
            objects.etag("t", "latest.json")
        assert objects.reachable
