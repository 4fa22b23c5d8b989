"""The shared prefix store (server/registry/shared_store.py): several replicas over one folder.

No Ray needed: two stores (or registries, or processes) over one folder stand for two replicas.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from conftest import STORE_FP as FP
from conftest import native_bytes
from conftest import put_prefix as put

from server.errors import PrefixNotFound
from server.registry.cache import PrefixCache
from server.registry.registry import PrefixRegistry
from server.registry.shared_store import SharedFolderStore


def replicas(root, n: int = 2) -> list[SharedFolderStore]:
    stores = [SharedFolderStore(root) for _ in range(n)]
    for store in stores:
        assert store.recover() == []
    return stores


def test_an_upload_through_one_replica_is_seen_by_the_other(tmp_path):
    a, b = replicas(tmp_path)
    assert put(a, "t", seed=1).version == 1
    assert b.get("t").version == 1
    assert [r.task_id for r in b.list()] == ["t"]
    # b learns the versions a issued before it writes: versions are never issued twice.
    assert put(b, "t", seed=2).version == 2
    assert a.get("t").version == 2 and a.get("t").sha256 == b.get("t").sha256
    a.delete("t")
    with pytest.raises(PrefixNotFound):
        b.get("t")
    assert [r.task_id for r in b.list()] == []
    assert put(b, "t", seed=3).version == 3  # after a delete too (the tombstone is on disk)
    assert a.get("t").version == 3


def test_a_new_task_appears_in_every_listing(tmp_path):
    a, b = replicas(tmp_path)
    put(a, "x", seed=1)
    put(b, "y", seed=2)
    assert [r.task_id for r in a.list()] == [r.task_id for r in b.list()] == ["x", "y"]


def test_reads_touch_no_file_and_never_go_back_a_version(tmp_path):
    a, b = replicas(tmp_path)
    folder = tmp_path / "tasks" / "t"
    put(a, "t", seed=1)
    old = {name: (folder / name).read_bytes() for name in ("v1.json", "v1.safetensors")}
    put(a, "t", seed=2)
    assert b.get("t").version == 2
    live = folder / ".v3.safetensors.abc.tmp"  # another replica's upload, half written
    live.write_bytes(b"partial")
    assert b.get("t").version == 2
    assert live.exists()  # a read never deletes a live write's temp file
    # A scan that raced a newer commit can see only an older version: the index keeps the newer one.
    for name in ("v2.json", "v2.safetensors"):
        (folder / name).unlink()
    for name, data in old.items():
        (folder / name).write_bytes(data)
    assert b.get("t").version == 2
    # Recovery (at startup) cleans leftovers, under the task's lock.
    c = SharedFolderStore(tmp_path)
    assert any("leftover temp file" in w for w in c.recover())
    assert not live.exists()


def test_on_change_runs_when_another_replica_changed_a_task(tmp_path):
    a, b = replicas(tmp_path)
    changed: list[str] = []
    b.on_change = changed.append
    put(a, "t", seed=1)
    b.get("t")
    b.get("t")  # unchanged folder: no re-read, no callback
    put(a, "t", seed=2)
    b.get("t")
    a.delete("t")
    with pytest.raises(PrefixNotFound):
        b.get("t")
    assert changed == ["t", "t", "t"]


def registry_over(root) -> PrefixRegistry:
    cache = PrefixCache(10_000_000)
    store = SharedFolderStore(root, on_change=cache.drop)
    store.recover()
    return PrefixRegistry(store, cache, FP, dtype=torch.float32, device="cpu")


def test_hot_swap_across_replicas(tmp_path):
    a, b = registry_over(tmp_path), registry_over(tmp_path)
    a.upload("t", native_bytes(1))
    record, prefix = b.acquire("t")  # a running request on b pins v1
    assert record.version == 1
    a.upload("t", native_bytes(2))  # a new version through the other replica ...
    new_record, new_prefix = b.acquire("t")  # ... is what b's next request gets
    assert new_record.version == 2 and not torch.equal(new_prefix.keys, prefix.keys)
    assert (("t", 1) in b.cache) and b.cache.pins(("t", 1)) == 1  # the running request keeps v1
    b.release(record)
    b.release(new_record)
    a.upload("t", native_bytes(3))
    b.get("t")  # b sees v3 and drops the superseded, unpinned v2 from its cache
    assert ("t", 2) not in b.cache


def _upload_many(root: str, seeds: list[int]) -> list[int]:
    store = SharedFolderStore(root)
    store.recover()
    return [put(store, "t", seed).version for seed in seeds]


def test_concurrent_writers_in_two_processes_never_share_a_version(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(
            _upload_many, [(str(tmp_path), list(range(10))), (str(tmp_path), list(range(10, 20)))]
        )
    versions = sorted(v for r in results for v in r)
    assert versions == list(range(1, 21))
    store = SharedFolderStore(tmp_path)
    assert store.recover() == []
    assert store.get("t").version == 20
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["v20.json", "v20.safetensors"]


def test_a_ray_replica_opens_the_folder_as_a_shared_store(tmp_path, tokenizer, monkeypatch):
    """A replica's registry: the shared folder store, recovered without touching other replicas' live
    uploads (a single server's folder store would remove their temp files), its hook wired."""
    pytest.importorskip("ray")
    from conftest import make_tiny_model

    import server.engine.model as model_module
    from server.config import Settings
    from server.distributed.replica import build_shared_components

    def load_model(spec, **kwargs):  # the tiny model; the store is what is under test
        return model_module.LoadedModel(make_tiny_model("llama-gqa"), tokenizer, "tiny", "test")

    monkeypatch.setattr(model_module, "load_model", load_model)
    root = tmp_path / "shared"
    (peer,) = replicas(root, 1)
    put(peer, "t", seed=1)
    settings = Settings(prefix_dir=root, max_batch_size=2, max_virtual_tokens=8, max_prompt_tokens=16)
    built = []
    live = root / "tasks" / "t" / ".v2.safetensors.abc.tmp"
    with peer.task_file_lock("t"):  # another replica's upload, in progress
        live.write_bytes(b"half")
        start = threading.Thread(target=lambda: built.append(build_shared_components(settings)))
        start.start()
        start.join(timeout=2.0)  # the replica's recovery waits for the upload's lock ...
        assert live.exists() and not built  # ... and never removes its temp file
        live.unlink()  # the upload ends (here: it gave up and cleaned up after itself)
    start.join(timeout=120)
    registry = built[0].registry
    assert type(registry.store) is SharedFolderStore and registry.store.root == root
    assert registry.store.on_change == registry.cache.drop
    assert registry.get("t").version == 1 and registry.recovery_warnings == []
    put(peer, "t", seed=2)
    assert registry.get("t").version == 2  # the peer's upload is seen at once
