"""On-disk store: atomic versioned writes, versions never reused, and recovery that serves only whole files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
from conftest import native_bytes
from conftest import put_prefix as put

from server.errors import InvalidRequest, PrefixNotFound
from server.registry.backends import recovered
from server.registry.folder_store import FolderStore
from server.registry.store import PrefixRecord, validate_task_id


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def store(tmp_path) -> FolderStore:
    s = FolderStore(tmp_path)
    assert s.recover() == []  # an empty or missing root is fine
    return s


def reopen(store: FolderStore) -> tuple[FolderStore, list[str]]:
    fresh = FolderStore(store.root)
    return fresh, fresh.recover()


def test_put_commits_files_and_recover_restores_them(store):
    record = put(store, "summarize", seed=1)
    assert (record.task_id, record.version, record.source) == ("summarize", 1, "native")
    assert record.bytes == len(native_bytes(1))
    folder = store.tasks_dir / "summarize"
    assert files(folder) == ["v1.json", "v1.safetensors"]  # no temp files left behind
    assert json.loads((folder / "v1.json").read_text()) == record.to_dict()
    assert store.read(record) == native_bytes(1)

    fresh, warnings = reopen(store)
    assert warnings == []
    assert fresh.get("summarize") == record
    assert fresh.list() == [record]


def test_new_version_replaces_older_files(store):
    put(store, "t", seed=1)
    record = put(store, "t", seed=2)
    assert record.version == 2
    assert files(store.tasks_dir / "t") == ["v2.json", "v2.safetensors"]
    assert store.get("t") == record
    with pytest.raises(FileNotFoundError):
        store.read(PrefixRecord("t", 1, "0" * 64, 4, 1, 0.0, "native"))


def test_versions_are_never_reused_after_delete(store):
    put(store, "t", seed=1)
    put(store, "t", seed=2)
    assert store.delete("t").version == 2
    with pytest.raises(PrefixNotFound, match="task 't' not found"):
        store.get("t")
    with pytest.raises(PrefixNotFound):
        store.delete("t")
    assert files(store.tasks_dir / "t") == ["deleted.json"]
    assert put(store, "t", seed=3).version == 3

    store.delete("t")
    fresh, warnings = reopen(store)  # the tombstone survives a restart
    assert warnings == []
    with pytest.raises(PrefixNotFound):
        fresh.get("t")
    assert put(fresh, "t", seed=4).version == 4


def test_recover_finishes_an_interrupted_delete(store, tmp_path):
    put(store, "t", seed=1)
    folder = store.tasks_dir / "t"
    shutil.copytree(folder, tmp_path / "saved")
    store.delete("t")
    for name in ("v1.json", "v1.safetensors"):  # crash after the tombstone, before the unlinks
        shutil.copy(tmp_path / "saved" / name, folder / name)
    fresh, _ = reopen(store)
    with pytest.raises(PrefixNotFound):
        fresh.get("t")
    assert files(folder) == ["deleted.json"]
    assert put(fresh, "t", seed=2).version == 2


def _no_json(folder: Path) -> None:
    (folder / "v2.json").unlink()


def _flip_bytes(folder: Path) -> None:
    path = folder / "v2.safetensors"
    data = bytearray(path.read_bytes())
    data[-5:] = bytes(b ^ 0xFF for b in data[-5:])
    path.write_bytes(bytes(data))


def _bad_json(folder: Path) -> None:
    (folder / "v2.json").write_text('{"task_id": "t", "vers')


def _no_safetensors(folder: Path) -> None:
    (folder / "v2.safetensors").unlink()


def _bad_header(folder: Path) -> None:
    # Whole and matching its sha256, but not a safetensors file: only read_metadata can tell.
    garbage = b"\xff" * 64
    (folder / "v2.safetensors").write_bytes(garbage)
    meta = json.loads((folder / "v2.json").read_text())
    meta.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (folder / "v2.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, words",
    [
        (_no_json, "never committed"),
        (_flip_bytes, "sha256"),
        (_bad_json, "unreadable"),
        (_no_safetensors, "has no v2.safetensors"),
        (_bad_header, "safetensors"),
    ],
    ids=["no-json", "sha-mismatch", "bad-json", "no-safetensors", "bad-header"],
)
def test_recover_serves_latest_valid_version(store, tmp_path, caplog, damage, words):
    v1 = put(store, "t", seed=1)
    folder = store.tasks_dir / "t"
    shutil.copytree(folder, tmp_path / "saved")
    put(store, "t", seed=2)
    for name in ("v1.json", "v1.safetensors"):  # as if the crash came before v1's cleanup
        shutil.copy(tmp_path / "saved" / name, folder / name)
    damage(folder)

    fresh = FolderStore(store.root)
    with caplog.at_level(logging.WARNING, logger="server.registry.backends"):
        warnings = recovered(fresh)  # as a server opens its store: the warnings are logged
    assert len(warnings) == 1 and "v2" in warnings[0] and words in warnings[0], warnings
    assert warnings[0] in caplog.text
    assert fresh.get("t") == v1
    assert fresh.read(v1) == native_bytes(1)
    assert put(fresh, "t", seed=3).version == 3  # the broken version's number is not reused
    assert files(folder) == ["v3.json", "v3.safetensors"]


def test_recover_with_only_a_broken_version_serves_nothing(store):
    put(store, "t", seed=1)
    path = store.tasks_dir / "t" / "v1.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    fresh, warnings = reopen(store)
    assert len(warnings) == 1
    assert fresh.list() == []
    assert put(fresh, "t", seed=2).version == 2


def test_recover_removes_temp_leftovers(store):
    record = put(store, "t", seed=1)
    folder = store.tasks_dir / "t"
    (folder / ".v2.safetensors.abc123.tmp").write_bytes(b"half a fi")
    (folder / ".deleted.json.x.tmp").write_bytes(b"")
    fresh, warnings = reopen(store)
    assert sum("temp file" in w for w in warnings) == 2
    assert files(folder) == ["v1.json", "v1.safetensors"]
    assert fresh.get("t") == record


def test_recover_ignores_unsafe_folder_names(store):
    put(store, "t", seed=1)
    (store.tasks_dir / "bad name").mkdir()
    fresh, warnings = reopen(store)
    assert len(warnings) == 1 and "bad name" in warnings[0]
    assert [r.task_id for r in fresh.list()] == ["t"]


GOOD_IDS = ["a", "Z", "task-1", "my_task.v2", "...", ".hidden", "x" * 64, "0"]
BAD_IDS = ["", ".", "..", "a/b", "../x", "a\\b", "x" * 65, "a b", "é", "a\x00b", "t\n", None, 7]


@pytest.mark.parametrize("task_id", GOOD_IDS)
def test_good_task_ids(task_id):
    assert validate_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", BAD_IDS)
def test_bad_task_ids(store, task_id):
    with pytest.raises(InvalidRequest, match=r"1-64 characters of A-Z a-z 0-9 \. _ -.*got"):
        validate_task_id(task_id)
    with pytest.raises(InvalidRequest):
        put(store, task_id, seed=1)
    for call in (store.get, store.delete):
        with pytest.raises(InvalidRequest):
            call(task_id)
    assert not store.tasks_dir.exists()  # nothing was written anywhere


def test_failed_encode_writes_nothing(store):
    put(store, "t", seed=1)
    before = files(store.tasks_dir / "t")

    def boom(version: int) -> bytes:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        store.put("t", boom, num_virtual_tokens=4, source="native")
    with pytest.raises(ValueError, match="source"):
        store.put("t", lambda v: b"", num_virtual_tokens=4, source="magic")
    assert files(store.tasks_dir / "t") == before
    assert store.get("t").version == 1


def test_concurrent_puts_get_distinct_increasing_versions(store):
    versions: list[int] = []
    barrier = threading.Barrier(8)

    def upload(seed: int) -> None:
        barrier.wait()
        versions.append(put(store, "t", seed).version)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))
    assert store.get("t").version == 8
    assert files(store.tasks_dir / "t") == ["v8.json", "v8.safetensors"]
