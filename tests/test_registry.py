"""Prefix registry: uploads validated against the model, hot swap, pins across delete, failed uploads change nothing."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from server.errors import InvalidRequest, Overloaded, PrefixFormatError, PrefixNotFound, PrefixServerError
from server.registry.format import (
    ModelFingerprint,
    PrefixKV,
    load_prefix,
    read_metadata,
    save_native,
    to_peft,
)
from server.registry.registry import PrefixRegistry

FP = ModelFingerprint("llama", 2, 2, 16)
FP3 = ModelFingerprint("llama", 3, 2, 16)  # one layer more than the model
CPU = torch.device("cpu")


def random_prefix(seed: int, num_virtual_tokens: int = 4, fp: ModelFingerprint = FP) -> PrefixKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.kv_heads, num_virtual_tokens, fp.head_dim)
    return PrefixKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), fp)


def open_registry(root: Path, cache_bytes: int = 1 << 20, dtype=torch.float32) -> PrefixRegistry:
    kwargs = dict(cache_bytes=cache_bytes, dtype=dtype, device=CPU, max_virtual_tokens=8)
    return PrefixRegistry.open(root, FP, **kwargs)


def assert_same(kv: PrefixKV, expected: PrefixKV) -> None:
    torch.testing.assert_close(kv.keys, expected.keys.to(kv.keys.dtype))
    torch.testing.assert_close(kv.values, expected.values.to(kv.values.dtype))


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its size and sha256 (folders as (-1, ""))."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        if p.is_file()
        else (-1, "")
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def registry(tmp_path) -> PrefixRegistry:
    return open_registry(tmp_path)


def test_upload_native_then_acquire_and_download(registry):
    prefix = random_prefix(1)
    record = registry.upload("qa", save_native(prefix))
    assert (record.task_id, record.version, record.source, record.num_virtual_tokens) == (
        "qa",
        1,
        "native",
        4,
    )
    assert registry.get("qa") == record and registry.list() == [record]
    assert record.to_dict()["created_at"] == record.created_at

    got, kv = registry.acquire("qa")
    assert got == record
    assert_same(kv, prefix)
    assert kv.keys.is_contiguous() and kv.values.is_contiguous() and kv.keys.device == CPU
    registry.release(got)

    data = registry.store.read(registry.get("qa"))
    assert hashlib.sha256(data).hexdigest() == record.sha256
    assert_same(load_prefix(data, FP), prefix)
    meta = read_metadata(data)
    assert (meta["task_id"], meta["version"], meta["source"]) == ("qa", "1", "native")
    assert registry.upload("qa", data).version == 2  # a downloaded file uploads again as is


def test_upload_peft_is_stored_native(registry):
    prefix = random_prefix(2, num_virtual_tokens=6)
    blob, config = to_peft(prefix)
    record = registry.upload("peft-task", blob, json.dumps(config).encode())
    assert (record.source, record.num_virtual_tokens) == ("peft", 6)
    assert read_metadata(registry.store.read(registry.get("peft-task")))["format"] == "prefix-server/v1"
    _, kv = registry.acquire("peft-task")
    assert_same(kv, prefix)
    registry.release(record)


def test_add_from_text_and_bfloat16_device_copies(tmp_path):
    registry = open_registry(tmp_path, dtype=torch.bfloat16)
    prefix = random_prefix(3)
    record = registry.add("from-text", prefix)
    assert record.source == "text"
    _, kv = registry.acquire("from-text")
    assert kv.keys.dtype == torch.bfloat16 and kv.keys.is_contiguous() and kv.values.is_contiguous()
    assert_same(kv, prefix)
    registry.release(record)
    with pytest.raises(PrefixFormatError, match="prefix has 3 layers, model has 2"):
        registry.add("other", random_prefix(4, fp=FP3))


def test_get_and_delete_unknown_task(registry):
    for call in (registry.get, registry.delete, registry.acquire, registry.acquire_cached):
        with pytest.raises(PrefixNotFound, match="task 'nope' not found"):
            call("nope")


def test_hot_swap_keeps_pinned_old_version_intact(registry):
    old, new = random_prefix(1), random_prefix(2)
    registry.upload("t", save_native(old))
    r1, kv1 = registry.acquire("t")
    registry.upload("t", save_native(new))
    r2, kv2 = registry.acquire("t")  # the very next acquire gets the new version
    assert (r1.version, r2.version) == (1, 2)
    assert_same(kv1, old)  # still intact and usable by the request that holds it
    assert_same(kv2, new)
    assert (kv1.keys @ kv1.keys.transpose(-1, -2)).isfinite().all()
    registry.release(r1)
    registry.release(r2)
    with pytest.raises(RuntimeError):
        registry.release(r1)


def test_delete_while_pinned(registry):
    prefix = random_prefix(5)
    registry.upload("t", save_native(prefix))
    record, kv = registry.acquire("t")
    assert registry.delete("t") == record
    assert_same(kv, prefix)
    with pytest.raises(PrefixNotFound):
        registry.acquire("t")
    assert registry.list() == []
    registry.release(record)
    assert registry.upload("t", save_native(prefix)).version == 2  # never reuses a deleted version


def nan_file() -> bytes:
    nan = torch.full((FP.num_layers, FP.kv_heads, 4, FP.head_dim), float("nan"))
    return save_native(PrefixKV(nan, nan.clone(), FP))


BAD_UPLOADS = {  # case: (make the file, adapter_config, words of the PrefixFormatError)
    "wrong-fingerprint": (
        lambda: save_native(random_prefix(1, fp=FP3)),
        None,
        "prefix has 3 layers, model has 2",
    ),
    "garbage": (lambda: b"definitely not safetensors", None, "not a safetensors file"),
    "too-many-tokens": (lambda: save_native(random_prefix(1, 9)), None, "limit is 8"),
    "bad-adapter-config": (lambda: to_peft(random_prefix(1))[0], b'{"peft_type": "LORA"}', "PREFIX_TUNING"),
    "nan": (nan_file, None, "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("task_id", ["existing", "new-task", "../escape"])
def test_failed_upload_changes_nothing(registry, case, task_id):
    make, adapter_config, words = BAD_UPLOADS[case]
    error = PrefixFormatError
    registry.upload("existing", save_native(random_prefix(1)))
    before, index = snapshot(registry.store.root), registry.list()
    if task_id == "../escape":  # the task id is checked before the file is even parsed
        error, words = InvalidRequest, "task_id must be"
    with pytest.raises(error, match=words):
        registry.upload(task_id, make(), adapter_config)
    assert snapshot(registry.store.root) == before
    assert registry.list() == index
    assert registry.upload("existing", save_native(random_prefix(2))).version == 2


def test_concurrent_uploads_get_distinct_increasing_versions(registry):
    prefixes = {seed: random_prefix(seed) for seed in range(8)}
    versions: dict[int, int] = {}
    barrier = threading.Barrier(len(prefixes))

    def upload(seed: int) -> None:
        barrier.wait()
        versions[registry.upload("t", save_native(prefixes[seed])).version] = seed

    threads = [threading.Thread(target=upload, args=(seed,)) for seed in prefixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))
    record, kv = registry.acquire("t")
    assert record.version == 8
    assert_same(kv, prefixes[versions[8]])
    registry.release(record)


def test_restart_recovers_the_index(tmp_path):
    prefix = random_prefix(1)
    first = open_registry(tmp_path)
    record = first.upload("t", save_native(prefix))
    second = open_registry(tmp_path)
    assert second.recovery_warnings == []
    assert second.list() == [record]
    _, kv = second.acquire("t")
    assert_same(kv, prefix)


def test_missing_file_is_an_error_not_a_loop(registry):
    record = registry.upload("t", save_native(random_prefix(1)))
    (registry.store.tasks_dir / "t" / f"v{record.version}.safetensors").unlink()
    with pytest.raises(PrefixServerError, match="missing"):
        registry.acquire("t")


def test_acquire_resolves_again_when_its_version_is_superseded(registry, monkeypatch):
    registry.upload("t", save_native(random_prefix(1)))
    stale = registry.get("t")
    new = random_prefix(2)
    registry.upload("t", save_native(new))  # v1's file is gone now
    real_get, calls = registry.store.get, []

    def get_stale_once(task_id):  # as if the upload landed between resolve and load
        calls.append(task_id)
        return stale if len(calls) == 1 else real_get(task_id)

    monkeypatch.setattr(registry.store, "get", get_stale_once)
    record, kv = registry.acquire("t")
    assert record.version == 2 and len(calls) == 2
    assert_same(kv, new)


def test_capacity_and_stats(tmp_path):
    nbytes = random_prefix(1).nbytes  # float32, 4 virtual tokens
    registry = open_registry(tmp_path, cache_bytes=2 * nbytes)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        registry.upload(name, save_native(random_prefix(seed)))
    ra, _ = registry.acquire("a")
    rb, _ = registry.acquire("b")
    assert ("a", ra.version) in registry.cache and ("c", 1) not in registry.cache
    with pytest.raises(Overloaded):  # a and b are pinned: c cannot fit
        registry.acquire("c")
    assert ("c", 1) not in registry.cache
    registry.release(ra)
    rc, _ = registry.acquire("c")  # a is unpinned now: it is evicted for c
    registry.release(rb)
    registry.release(rc)
    ra, _ = registry.acquire("a")  # was evicted for c: loads again
    registry.release(ra)
    stats = registry.stats()
    assert stats["num_tasks"] == 3
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (0, 5, 2)
    assert stats["bytes_in_use"] == 2 * nbytes and stats["pinned_bytes"] == 0
    assert stats["load_seconds_total"] > 0
