"""The S3-compatible prefix store (server/registry/s3_store.py) against moto's S3 server.

moto runs as a real HTTP endpoint on a free localhost port, and boto3 reaches it through the standard
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): the code path MinIO would see. Two stores (or
registries, or apps) on one bucket stand for two servers. TTL 0 = check the bucket on every lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import uuid

import pytest
import torch

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from conftest import STORE_FP as FP  # noqa: E402
from conftest import app_client, make_tiny_model, native_bytes, use_s3_endpoint  # noqa: E402
from conftest import put_prefix as put  # noqa: E402

from server.config import Settings  # noqa: E402
from server.errors import ConfigError, InvalidRequest, PrefixNotFound, PrefixServerError  # noqa: E402
from server.registry.backends import open_store  # noqa: E402
from server.registry.format import save_native  # noqa: E402
from server.registry.registry import PrefixRegistry  # noqa: E402
from server.registry.s3_bucket import TaskObjects  # noqa: E402
from server.registry.s3_store import S3PrefixStore  # noqa: E402


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(endpoint, monkeypatch, tmp_path):
    """boto3's standard sources, and nothing from this machine's ~/.aws."""
    use_s3_endpoint(monkeypatch, endpoint, tmp_path)
    return endpoint


@pytest.fixture
def url(aws_env) -> str:
    """A fresh bucket, with a key prefix: s3://<bucket>/cluster-a."""
    name = f"prefixes-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/cluster-a"


def replicas(url: str, n: int = 2, ttl_s: float = 0.0) -> list[S3PrefixStore]:
    stores = [S3PrefixStore.from_url(url, ttl_s=ttl_s) for _ in range(n)]
    for store in stores:
        assert store.recover() == []
    return stores


def names(store: S3PrefixStore, task_id: str) -> list[str]:
    return sorted(store.objects.list_task(task_id))


def write(store: S3PrefixStore, task_id: str, name: str, body: bytes) -> None:
    store.objects.put(task_id, name, body)


def test_put_get_list_read_delete_round_trip(url):
    (store,) = replicas(url, 1)
    record = put(store, "summarize", seed=1)
    assert (record.task_id, record.version, record.bytes) == ("summarize", 1, len(native_bytes(1)))
    assert store.get("summarize") == record and store.list() == [record]
    assert store.read(record) == native_bytes(1)
    assert names(store, "summarize") == ["latest.json", "v1.json", "v1.safetensors"]
    assert store.objects.key("summarize", "v1.json") == "cluster-a/tasks/summarize/v1.json"
    assert json.loads(store.objects.get("summarize", "v1.json")) == record.to_dict()
    v2 = put(store, "summarize", seed=2)
    assert v2.version == 2 and names(store, "summarize") == ["latest.json", "v2.json", "v2.safetensors"]
    with pytest.raises(FileNotFoundError):
        store.read(record)  # superseded: the registry resolves again
    fresh = S3PrefixStore.from_url(url, ttl_s=0.0)
    assert fresh.recover() == [] and fresh.list() == [v2]
    assert store.delete("summarize") == v2
    assert names(store, "summarize") == ["deleted-2.json", "latest.json"]
    for s in (store, fresh):
        with pytest.raises(PrefixNotFound):
            s.get("summarize")
        with pytest.raises(PrefixNotFound):
            s.delete("summarize")
    assert store.list() == [] and fresh.list() == []
    for bad in ("", ".", "..", "a/b", "x" * 65, "~t", "a b"):
        with pytest.raises(InvalidRequest):
            store.get(bad)
        with pytest.raises(InvalidRequest):
            put(store, bad, seed=1)


def test_an_upload_through_one_replica_is_seen_by_the_other(url):
    a, b = replicas(url)
    assert put(a, "t", seed=1).version == 1
    assert b.get("t").version == 1
    assert put(b, "t", seed=2).version == 2  # b learns the versions a issued: never issued twice
    assert a.get("t").version == 2 and a.get("t").sha256 == b.get("t").sha256
    assert a.read(a.get("t")) == native_bytes(2)
    put(a, "x", seed=3)
    assert [r.task_id for r in b.list()] == ["t", "x"]
    a.delete("t")
    with pytest.raises(PrefixNotFound):
        b.get("t")
    assert [r.task_id for r in b.list()] == ["x"]
    assert put(b, "t", seed=4).version == 3  # after a delete too: its tombstone is in the bucket
    assert a.get("t").version == 3


def test_a_replica_trusts_its_index_for_the_ttl_then_checks(url):
    (a,) = replicas(url, 1)
    put(a, "t", seed=1)
    put(a, "u", seed=1)
    b = S3PrefixStore.from_url(url, ttl_s=3600.0)
    assert b.recover() == [] and b.get("t").version == 1
    assert [r.task_id for r in b.list()] == ["t", "u"]
    put(a, "t", seed=2)
    a.delete("u")
    put(a, "new", seed=3)
    assert b.get("t").version == 1  # within the TTL: no request to the bucket
    assert [r.task_id for r in b.list()] == ["t", "u"]
    b.ttl_s = 0.0  # the TTL has passed
    assert b.get("t").version == 2
    assert [r.task_id for r in b.list()] == ["new", "t"]


def test_a_vanished_version_is_looked_up_again_within_the_ttl(url):
    (a,) = replicas(url, 1)
    (b,) = replicas(url, 1, ttl_s=3600.0)
    put(a, "t", seed=1)
    old = b.get("t")
    put(a, "t", seed=2)  # removes v1
    with pytest.raises(FileNotFoundError):
        b.read(old)
    assert b.get("t").version == 2  # the miss sends the next lookup to the bucket


def test_a_commit_whose_writer_died_before_the_marker_is_found_by_a_listing(url):
    a, b = replicas(url)
    v1 = put(a, "t", seed=1)
    assert b.get("t") == v1
    v2 = dataclasses.replace(v1, version=2, sha256=hashlib.sha256(native_bytes(2)).hexdigest())
    write(a, "t", "v2.safetensors", native_bytes(2))
    write(a, "t", "v2.json", json.dumps(v2.to_dict()).encode())  # and then no latest.json rewrite
    assert b.get("t") == v1  # the marker did not change
    assert b.list() == [v2]  # but a listing shows a version this index never saw
    assert b.get("t") == v2 and b.read(v2) == native_bytes(2)


def test_on_change_runs_when_another_replica_changed_a_task(url):
    a, b = replicas(url)
    changed: list[str] = []
    a.on_change = b.on_change = changed.append
    put(a, "t", seed=1)  # a's own writes: no callback
    b.get("t")
    b.get("t")  # unchanged marker: no listing, no callback
    put(a, "t", seed=2)
    b.get("t")
    a.delete("t")
    with pytest.raises(PrefixNotFound):
        b.get("t")
    assert changed == ["t", "t", "t"]


@pytest.mark.parametrize("shared", [False, True])
def test_open_store_picks_the_object_store_for_an_s3_url(url, tmp_path, shared):
    """A Ray replica (shared=True) over an s3:// URL gets the very store a single server gets."""
    settings = Settings(prefix_store=url, prefix_store_ttl_s=7.0, prefix_dir=tmp_path / "unused")
    store = open_store(settings, shared=shared)
    assert type(store) is S3PrefixStore and store.ttl_s == 7.0 and store.on_change is None
    registry = PrefixRegistry.from_settings(settings, FP, dtype=torch.float32, device="cpu", shared=shared)
    assert type(registry.store) is S3PrefixStore and registry.store.on_change == registry.cache.drop
    assert registry.upload("t", native_bytes(1)).version == 1
    assert not (tmp_path / "unused").exists()


def registry_over(url: str) -> PrefixRegistry:
    return PrefixRegistry.open(
        url, FP, cache_bytes=10_000_000, dtype=torch.float32, device="cpu", store_ttl_s=0.0
    )


def test_hot_swap_across_replicas(url):
    a, b = registry_over(url), registry_over(url)
    assert isinstance(b.store, S3PrefixStore) and b.store.on_change == b.cache.drop
    a.upload("t", native_bytes(1))
    record, prefix = b.acquire("t")  # a running request on b pins v1
    assert record.version == 1
    a.upload("t", native_bytes(2))  # a new version through the other replica ...
    new_record, new_prefix = b.acquire("t")  # ... is what b's next request gets
    assert new_record.version == 2 and not torch.equal(new_prefix.keys, prefix.keys)
    assert b.cache.pins(("t", 1)) == 1  # the running request keeps v1
    b.release(record)
    b.release(new_record)
    a.upload("t", native_bytes(3))
    b.get("t")  # b sees v3 and drops the superseded, unpinned v2 from its cache
    assert ("t", 2) not in b.cache
    assert b.store.read(b.get("t")) == a.store.read(a.get("t"))


def test_concurrent_uploads_from_two_replicas_get_distinct_increasing_versions(url):
    stores = replicas(url)
    results: dict[int, list[tuple[int, int]]] = {}

    def upload_many(writer: int) -> None:
        store = stores[writer % 2]
        results[writer] = [
            (put(store, "t", seed).version, seed) for seed in range(writer * 10, writer * 10 + 6)
        ]

    threads = [threading.Thread(target=upload_many, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [v for r in results.values() for v, _ in r]
    assert len(versions) == 24 and len(set(versions)) == 24  # nothing lost, nothing issued twice
    for r in results.values():
        assert [v for v, _ in r] == sorted(v for v, _ in r)  # each writer's versions increase
    newest, seed = max(v for r in results.values() for v in r)
    for store in stores:
        assert store.get("t").version == newest and store.read(store.get("t")) == native_bytes(seed)
    fresh = S3PrefixStore.from_url(url)
    assert fresh.recover() == [] and fresh.get("t").version == newest
    assert names(fresh, "t") == ["latest.json", f"v{newest}.json", f"v{newest}.safetensors"]


def stale_once(store: S3PrefixStore) -> None:
    """The next put's first listing is empty, as if it were taken before the other replica wrote."""
    real = store.objects.list_task
    calls = iter([lambda task_id: {}])
    store.objects.list_task = lambda task_id: next(calls, real)(task_id)


def test_a_taken_version_makes_the_writer_take_the_next(url):
    a, b = replicas(url)
    put(b, "t", seed=1)
    stale_once(a)
    assert put(a, "t", seed=2).version == 2  # v1.safetensors existed: 412, then v2
    assert b.get("t").version == 2 and b.read(b.get("t")) == native_bytes(2)


def test_a_commit_that_a_newer_version_or_a_delete_got_ahead_of_is_withdrawn(url):
    a, b = replicas(url)
    put(b, "t", seed=1)
    put(b, "t", seed=2)  # v1's objects are gone, so a stale writer can create v1 again ...
    stale_once(a)
    assert put(a, "t", seed=3).version == 3  # ... but it is withdrawn: v2 was already there
    assert names(a, "t") == ["latest.json", "v3.json", "v3.safetensors"]
    put(b, "u", seed=1)
    b.delete("u")
    stale_once(a)
    assert put(a, "u", seed=2).version == 2  # v1 re-created after its delete: withdrawn too
    assert b.get("u").version == 2 and b.read(b.get("u")) == native_bytes(2)


def test_corrupt_or_partial_objects_are_skipped_and_never_served(url, caplog):
    a, b = replicas(url)
    put(a, "t", seed=1)
    assert b.get("t").version == 1
    bad_sha = {**a.get("t").to_dict(), "version": 2}
    write(a, "t", "v2.safetensors", native_bytes(2))
    write(a, "t", "v2.json", json.dumps(bad_sha).encode())  # its sha256 is v1's: not this file
    write(a, "t", "v3.safetensors", native_bytes(3))
    write(a, "t", "v3.json", b'{"task_id": "t", "vers')  # truncated
    write(a, "t", "v4.safetensors", b"half an upload in progress")  # no v4.json: not committed
    write(a, "t", "latest.json", b"{}")  # what a writer does after its commit
    with caplog.at_level(logging.WARNING, logger="server.registry.s3_store"):
        assert b.get("t").version == 1 and b.read(b.get("t")) == native_bytes(1)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "server.registry.s3_store")
    assert "v2.*: file has" in logged and "v3.*: unreadable" in logged and "v4" not in logged
    fresh = S3PrefixStore.from_url(url)
    warnings = fresh.recover()
    assert [w.split(": ", 1)[0].rsplit("/", 1)[1] for w in warnings] == ["v4.*", "v3.*", "v2.*"]
    assert fresh.get("t").version == 1
    assert "v4.safetensors" in names(fresh, "t")  # newer broken objects stay, for inspection
    assert put(b, "t", seed=5).version == 5  # versions only grow, past the broken ones too
    # A file that changes after it was indexed is refused on read.
    record = a.get("t")
    write(a, "t", "v5.safetensors", native_bytes(6))
    with pytest.raises(PrefixServerError, match="corrupt"):
        a.read(record)


def test_delete_then_upload_never_reuses_a_version(url):
    a, b = replicas(url)
    put(a, "t", seed=1)
    put(a, "t", seed=2)
    a.delete("t")
    (c,) = replicas(url, 1)  # a server started after the delete
    assert put(c, "t", seed=3).version == 3
    assert b.get("t").version == 3
    b.delete("t")
    assert names(a, "t") == ["deleted-3.json", "latest.json"]  # the older tombstone is gone
    (d,) = replicas(url, 1)
    assert put(d, "t", seed=4).version == 4 and a.get("t").version == 4


def test_tenant_namespaced_ids(url):
    a, b = replicas(url)
    put(a, "acme~chat", seed=1)
    put(a, "beta~chat", seed=2)
    put(a, "chat", seed=3)
    assert [(r.task_id, r.version) for r in b.list()] == [("acme~chat", 1), ("beta~chat", 1), ("chat", 1)]
    assert b.read(b.get("beta~chat")) == native_bytes(2)
    assert a.objects.key("acme~chat", "v1.json") == "cluster-a/tasks/acme~chat/v1.json"
    b.delete("acme~chat")
    assert [r.task_id for r in a.list()] == ["beta~chat", "chat"]
    with pytest.raises(InvalidRequest):
        a.get("bad tenant~chat")


def test_a_bucket_that_cannot_be_used_fails_with_its_url(aws_env, monkeypatch):
    with pytest.raises(PrefixServerError, match=r"prefix store s3://no-such-bucket/x: .*no such bucket"):
        S3PrefixStore.from_url("s3://no-such-bucket/x")
    with socket_closed() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(PrefixServerError, match=rf"s3://some-bucket: .*127.0.0.1:{port}.*cannot be used"):
            S3PrefixStore.from_url("s3://some-bucket")
    for bad in ("s3://", "s3://UPPER", "http://bucket", "s3://a"):
        with pytest.raises(ConfigError, match="prefix_store"):
            Settings(prefix_store=bad)
    with pytest.raises(ConfigError, match="must be s3://bucket"):  # the operator's to fix, not a client's
        TaskObjects(None, "http://bucket")
    env = {"PREFIX_SERVER_PREFIX_STORE": "s3://b-1/k", "PREFIX_SERVER_PREFIX_STORE_TTL_S": "0.5"}
    settings = Settings.from_env(environ=env)
    assert (settings.prefix_store, settings.prefix_store_ttl_s) == ("s3://b-1/k", 0.5)


def test_serve_stops_at_once_naming_the_bucket(aws_env, capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--prefix-store", "s3://no-such-bucket/prefixes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-server: error: prefix store s3://no-such-bucket/prefixes: ")
    assert "Traceback" not in err


@contextlib.contextmanager
def socket_closed():
    """A localhost port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


async def test_two_servers_on_one_bucket_serve_each_others_uploads(url, tokenizer, monkeypatch, tmp_path):
    """Through the HTTP API: upload through one app, generate through the other, same tokens."""
    import server.engine.model as model_module
    from server.api.app import build_components, create_app

    def load_model(spec, **kwargs):  # a fresh tiny model per server, the same weights in each
        return model_module.LoadedModel(make_tiny_model("llama-gqa"), tokenizer, "tiny", "test")

    monkeypatch.setattr(model_module, "load_model", load_model)
    settings = Settings(
        prefix_store=url,
        prefix_store_ttl_s=0.0,
        prefix_dir=tmp_path / "unused",
        max_batch_size=4,
        max_batch_wait_ms=1.0,
        max_virtual_tokens=32,
        max_prompt_tokens=64,
        max_new_tokens=16,
    )
    components = [build_components(settings) for _ in range(2)]  # each its own engine and registry
    assert all(isinstance(c.registry.store, S3PrefixStore) for c in components)
    assert not (tmp_path / "unused").exists()
    engine = components[0].engine
    prefix = [save_native(engine.encode_prefix(list(range(10 + 7 * s, 30 + 7 * s)))) for s in range(2)]
    body = {"task_id": "chat", "prompt": "Hello!", "max_new_tokens": 8, "ignore_eos": True}

    async def upload(client, data: bytes) -> dict:
        files = {"file": ("prefix.safetensors", data)}
        resp = await client.post("/prefixes", data={"task_id": "chat"}, files=files)
        assert resp.status_code == 201, resp.text
        return resp.json()

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for c in components:
            clients.append(await stack.enter_async_context(app_client(create_app(settings, c))))
        a, b = clients
        assert (await upload(a, prefix[0]))["version"] == 1
        through_b = (await b.post("/generate", json=body)).json()
        through_a = (await a.post("/generate", json=body)).json()
        assert through_b["prefix_version"] == through_a["prefix_version"] == 1
        assert through_b["token_ids"] == through_a["token_ids"] and len(through_a["token_ids"]) == 8
        base = (await b.post("/generate", json={**body, "task_id": None})).json()
        assert base["token_ids"] != through_b["token_ids"]  # the prefix made a difference
        assert (await upload(b, prefix[1]))["version"] == 2  # hot swap through the other server
        swapped = (await a.post("/generate", json=body)).json()
        assert swapped["prefix_version"] == 2 and swapped["token_ids"] != through_a["token_ids"]
        assert swapped["token_ids"] == (await b.post("/generate", json=body)).json()["token_ids"]
        listing = (await a.get("/prefixes")).json()["prefixes"]
        assert [(p["task_id"], p["version"]) for p in listing] == [("chat", 2)]
        assert (await b.delete("/prefixes/chat")).status_code == 204
        resp = await a.post("/generate", json=body)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "task_not_found"
