"""One store contract, three backends: `open_store(settings)` picks the backend from Settings, every
backend follows the PrefixStore protocol, and opening a registry logs what the store's recovery found.
The S3 backend's pick is tested in test_s3_store.py (it needs moto's server)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import STORE_FP as FP
from conftest import native_bytes
from conftest import put_prefix as put

from server.config import Settings
from server.registry.backends import open_store, recovered
from server.registry.folder_store import FolderStore
from server.registry.registry import PrefixRegistry
from server.registry.shared_store import SharedFolderStore
from server.registry.store import PrefixStore

PROTOCOL = [n for n in vars(PrefixStore) if not n.startswith("_")] + ["root", "on_change"]


@pytest.mark.parametrize("shared, kind", [(False, FolderStore), (True, SharedFolderStore)])
def test_open_store_picks_the_folder_backend(tmp_path, shared, kind):
    store = open_store(Settings(prefix_dir=tmp_path / "p"), shared=shared)
    assert type(store) is kind and store.root == tmp_path / "p"
    assert store.on_change is None  # set by the registry that opens it
    assert all(hasattr(store, name) for name in PROTOCOL)
    assert store.recover() == []
    assert put(store, "t", seed=1).version == 1
    assert store.read(store.get("t")) == native_bytes(1)


def test_open_store_is_not_recovered_yet(tmp_path):
    put(open_store(Settings(prefix_dir=tmp_path)), "t", seed=1)
    store = open_store(Settings(prefix_dir=tmp_path))
    assert store.list() == []  # the caller recovers it, once, at startup
    recovered(store)
    assert [r.task_id for r in store.list()] == ["t"]


def registry_from(settings: Settings, **kwargs) -> PrefixRegistry:
    return PrefixRegistry.from_settings(
        settings, FP, dtype=torch.float32, device=torch.device("cpu"), **kwargs
    )


@pytest.mark.parametrize("shared", [False, True])
def test_from_settings_builds_the_registry_over_the_store(tmp_path, shared):
    settings = Settings(prefix_dir=tmp_path, prefix_cache_bytes=12345, max_virtual_tokens=9)
    registry = registry_from(settings, shared=shared)
    assert type(registry.store) is (SharedFolderStore if shared else FolderStore)
    assert registry.store.on_change == registry.cache.drop  # the protocol's hook, every backend
    assert registry.cache.capacity_bytes == 12345 and registry.max_virtual_tokens == 9
    record = registry.upload("t", native_bytes(1))
    assert registry_from(settings).get("t") == record


def test_a_shared_registry_drops_what_another_server_superseded(tmp_path):
    settings = Settings(prefix_dir=tmp_path)
    a, b = registry_from(settings, shared=True), registry_from(settings, shared=True)
    a.upload("t", native_bytes(1))
    record, _ = b.acquire("t")
    b.release(record)
    assert ("t", 1) in b.cache
    a.upload("t", native_bytes(2))
    assert b.get("t").version == 2 and ("t", 1) not in b.cache  # on_change ran: v1 dropped


def test_recovery_warnings_are_logged_when_the_registry_opens(tmp_path, caplog):
    settings = Settings(prefix_dir=tmp_path)
    registry_from(settings).upload("t", native_bytes(1))
    folder = tmp_path / "tasks" / "t"
    (folder / "v2.safetensors").write_bytes(b"half an upload")  # a crash before v2's commit
    (folder / "stray.txt").write_text("?")
    with caplog.at_level(logging.WARNING, logger="server.registry.backends"):
        registry = registry_from(settings)
    warnings = registry.recovery_warnings
    assert len(warnings) == 2 and any("stray.txt" in w for w in warnings)
    assert any("v2" in w and "never committed" in w for w in warnings)
    logged = [r for r in caplog.records if r.name == "server.registry.backends"]
    assert [r.levelno for r in logged] == [logging.WARNING] * 2
    assert all(
        w in r.getMessage() and str(tmp_path) in r.getMessage() for w, r in zip(warnings, logged, strict=True)
    )
    assert registry.get("t").version == 1


def test_open_keeps_its_signature_over_the_same_factory(tmp_path):
    registry = PrefixRegistry.open(tmp_path, FP, cache_bytes=1000, dtype=torch.float32, device="cpu")
    assert type(registry.store) is FolderStore and registry.store.on_change == registry.cache.drop
