"""The prefix registry: validated uploads into the store, pinned hot-swappable prefixes from the cache.

Thread-safe without a lock of its own: the store's index is the one source of truth for "latest", and
the cache pins by (task_id, version). Every acquire that starts after an upload returns resolves the new
version; one that resolved a version just before an upload or delete removed its file resolves again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from server.errors import PrefixFormatError, PrefixServerError
from server.registry.backends import open_store, recovered, store_at
from server.registry.cache import PrefixCache
from server.registry.format import (
    FORMAT_NAME,
    ModelFingerprint,
    PrefixKV,
    load_prefix,
    read_metadata,
    save_native,
)
from server.registry.frame import TaskFrame
from server.registry.store import PrefixRecord, PrefixStore, validate_task_id

if TYPE_CHECKING:
    from server.config import Settings

T = TypeVar("T")


class PrefixRegistry:
    """Upload / add / get / list / delete prefixes, and acquire / release their tensors for requests."""

    def __init__(
        self,
        store: PrefixStore,
        cache: PrefixCache,
        fingerprint: ModelFingerprint,
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_virtual_tokens: int = 256,
        store_read_delay_ms: float = 0.0,
    ) -> None:
        self.store = store
        self.cache = cache
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_virtual_tokens = max_virtual_tokens
        self.store_read_delay_ms = store_read_delay_ms  # benchmarks and tests: a slow store (see _load)
        self.recovery_warnings: list[str] = []  # what the store's recovery found; logged when opened
        store.on_change = cache.drop  # another server changed a task: drop the versions it superseded

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        fingerprint: ModelFingerprint,
        *,
        dtype: torch.dtype,
        device: torch.device,
        shared: bool = False,
    ) -> PrefixRegistry:
        """The registry over the store `settings` name (see backends.open_store; `shared`: other servers
        write its folder too, as Ray replicas do), recovered, its warnings logged."""
        return cls.over(
            open_store(settings, shared=shared),
            fingerprint,
            cache_bytes=settings.prefix_cache_bytes,
            dtype=dtype,
            device=device,
            max_virtual_tokens=settings.max_virtual_tokens,
            store_read_delay_ms=settings.store_read_delay_ms,
        )

    @classmethod
    def over(
        cls, store: PrefixStore, fingerprint: ModelFingerprint, *, cache_bytes: int, **options
    ) -> PrefixRegistry:
        """A registry over `store`, whose index is recovered now (warnings logged, and kept in
        `recovery_warnings`); `options` as the constructor's."""
        warnings = recovered(store)
        registry = cls(store, PrefixCache(cache_bytes), fingerprint, **options)
        registry.recovery_warnings = warnings
        return registry

    @classmethod
    def open(
        cls,
        root: Path | str,
        fingerprint: ModelFingerprint,
        *,
        cache_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
        max_virtual_tokens: int = 256,
        store_ttl_s: float = 1.0,
        store_read_delay_ms: float = 0.0,
    ) -> PrefixRegistry:
        """A registry over the store at `root`, its index recovered: a folder, or an S3-compatible
        object store for a string s3://bucket[/key/prefix] (see s3_store.py; `store_ttl_s` is its TTL).
        `store_read_delay_ms`: each prefix load sleeps this long before reading (a slow store, for tests).
        Servers open theirs with `from_settings`; this is for tests and tools."""
        return cls.over(
            store_at(root, ttl_s=store_ttl_s),
            fingerprint,
            cache_bytes=cache_bytes,
            dtype=dtype,
            device=device,
            max_virtual_tokens=max_virtual_tokens,
            store_read_delay_ms=store_read_delay_ms,
        )

    def upload(
        self,
        task_id: str,
        data: bytes,
        adapter_config: bytes | None = None,
        frame: TaskFrame | None = None,
    ) -> PrefixRecord:
        """Validate a native or PEFT prefix file against the model and store it, as native float32, as a new version.

        A native file's prompt frame is kept; each field `frame` sets replaces the file's (a PEFT file has none).
        """
        validate_task_id(task_id)
        prefix = load_prefix(
            data,
            self.fingerprint,
            adapter_config=adapter_config,
            max_virtual_tokens=self.max_virtual_tokens,
            dtype=torch.float32,
        )
        # load_prefix accepted it, so the header parses and the format says which kind it was.
        metadata = read_metadata(data)
        source = "native" if metadata.get("format") == FORMAT_NAME else "peft"
        stored = TaskFrame.from_metadata(metadata) if source == "native" else None
        return self._put(task_id, prefix, source, (stored or TaskFrame()).merged(frame))

    def add(
        self, task_id: str, prefix: PrefixKV, source: str = "text", frame: TaskFrame | None = None
    ) -> PrefixRecord:
        """Store a prefix made in process (prefix-from-text) as a new version, with its prompt frame if any."""
        validate_task_id(task_id)
        self.fingerprint.check(prefix.fingerprint)
        if prefix.num_virtual_tokens > self.max_virtual_tokens:
            raise PrefixFormatError(
                f"prefix has {prefix.num_virtual_tokens} virtual tokens, limit is {self.max_virtual_tokens}"
            )
        if not (torch.isfinite(prefix.keys).all() and torch.isfinite(prefix.values).all()):
            raise PrefixFormatError("prefix contains NaN or Inf values")
        return self._put(task_id, prefix.to("cpu", torch.float32), source, frame)

    def get(self, task_id: str) -> PrefixRecord:
        """The latest version of a task; PrefixNotFound otherwise."""
        return self.store.get(task_id)

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task, sorted by task_id."""
        return self.store.list()

    def delete(self, task_id: str) -> PrefixRecord:
        """Delete a task (PrefixNotFound if absent); requests already holding its tensors keep them."""
        record = self.store.delete(task_id)
        self.cache.drop(task_id)
        return record

    def acquire(self, task_id: str) -> tuple[PrefixRecord, PrefixKV]:
        """Pin the latest version of a task; pair with `release(record)`.

        keys, values: [num_layers, kv_heads, num_virtual_tokens, head_dim], contiguous, on `device` in
        `dtype`. Shared between requests: read only.
        """
        return self._with_latest(
            task_id, lambda r: self.cache.acquire((r.task_id, r.version), functools.partial(self._load, r))
        )

    def acquire_cached(self, task_id: str) -> tuple[PrefixRecord, PrefixKV] | None:
        """`acquire` if the cache holds the latest version already, else None: no store read, no torch
        work, so it may run on the event loop. PrefixNotFound if the task does not exist."""
        record = self.store.get(task_id)
        prefix = self.cache.acquire_cached((record.task_id, record.version))
        return None if prefix is None else (record, prefix)

    def release(self, record: PrefixRecord) -> None:
        """Unpin what `acquire` returned with `record`."""
        self.cache.release((record.task_id, record.version))

    def stats(self) -> dict:
        """Cache counters (see PrefixCache.stats) plus the number of tasks."""
        return {"num_tasks": len(self.store.list()), **self.cache.stats()}

    def _put(self, task_id: str, prefix: PrefixKV, source: str, frame: TaskFrame | None) -> PrefixRecord:
        frame_metadata = {} if frame is None else frame.to_metadata()

        def encode(version: int) -> bytes:
            extra = {**frame_metadata, "task_id": task_id, "version": str(version), "source": source}
            return save_native(prefix, extra)

        record = self.store.put(task_id, encode, num_virtual_tokens=prefix.num_virtual_tokens, source=source)
        self.cache.drop(task_id)  # free superseded versions now, unless running requests pin them
        return record

    def _load(self, record: PrefixRecord) -> PrefixKV:
        if self.store_read_delay_ms:  # --store-read-delay-ms: the one place a slow store is simulated
            time.sleep(self.store_read_delay_ms / 1000)
        data = self.store.read(record)
        prefix = load_prefix(
            data, self.fingerprint, max_virtual_tokens=self.max_virtual_tokens, dtype=self.dtype
        )
        return prefix.to(device=self.device)  # [num_layers, kv_heads, num_virtual_tokens, head_dim]

    def _with_latest(self, task_id: str, use: Callable[[PrefixRecord], T]) -> tuple[PrefixRecord, T]:
        """(latest record, use(record)), resolving again if the record's file vanished in between."""
        stale: PrefixRecord | None = None
        while True:
            record = self.store.get(task_id)  # PrefixNotFound once deleted
            try:
                return record, use(record)
            except FileNotFoundError as e:
                if record == stale:  # the index still names it, so it is not a race: the file is gone
                    raise PrefixServerError(
                        f"stored file of task {task_id!r} v{record.version} is missing under {self.store.root}"
                    ) from e
                stale = record
