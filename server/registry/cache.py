"""In-memory prefix cache: a byte budget, LRU eviction of unpinned entries, explicit pins (refcounts).

A prefix a running request uses is pinned and is never evicted; every `acquire` is paired with one
`release`. Evicting something a running batch still reads is the bug this shape rules out (vLLM #14497).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from server.errors import Overloaded

Key = tuple[str, int]  # (task_id, version)


class HasNbytes(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=HasNbytes)


@dataclass
class _Entry:
    value: Any
    nbytes: int
    pins: int = 0


class PrefixCache:
    """LRU cache of prefixes within `capacity_bytes`, keyed by (task_id, version); thread-safe.

    The loader runs outside the lock, so a slow disk read never blocks hits, releases or other loads.
    The price: two threads missing the same key at once may both load it; the later copy is dropped.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be a positive integer, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._bytes_in_use = 0
        self._pinned_bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._load_seconds = 0.0

    def acquire(self, key: Key, loader: Callable[[], V]) -> V:
        """Pin and return the value of `key`, calling `loader()` on a miss; Overloaded if it cannot fit."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._hits += 1
                return self._pin(key, entry)
            self._misses += 1
        start = time.perf_counter()
        value = loader()
        elapsed = time.perf_counter() - start
        with self._lock:
            self._load_seconds += elapsed
            entry = self._entries.get(key)
            if entry is None:  # else another thread loaded it meanwhile: share that copy
                nbytes = value.nbytes
                if self._pinned_bytes + nbytes > self.capacity_bytes:
                    raise Overloaded(
                        f"prefix cache budget is {self.capacity_bytes} bytes and {self._pinned_bytes} bytes "
                        f"are pinned by running requests; task {key[0]!r} v{key[1]} needs {nbytes} bytes"
                    )
                self._evict_down_to(self.capacity_bytes - nbytes)
                entry = _Entry(value, nbytes)
                self._entries[key] = entry
                self._bytes_in_use += nbytes
            return self._pin(key, entry)

    def acquire_cached(self, key: Key) -> Any | None:
        """Pin and return the value of `key` if it is cached (a hit), else None (not counted as a miss:
        the caller loads it with `acquire` next)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._hits += 1
            return self._pin(key, entry)

    def release(self, key: Key) -> None:
        """Unpin one `acquire` of `key`; RuntimeError if it is not pinned (an unpaired release is a bug)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise RuntimeError(f"release of task {key[0]!r} v{key[1]}, which is not pinned")
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned_bytes -= entry.nbytes

    def drop(self, task_id: str) -> int:
        """Remove the unpinned entries of a task (superseded or deleted); returns how many went."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if k[0] == task_id and e.pins == 0]
            for key in keys:
                self._bytes_in_use -= self._entries.pop(key).nbytes
            return len(keys)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def pins(self, key: Key) -> int:
        """How many acquires of `key` are not yet released (0 if not cached)."""
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.pins

    def stats(self) -> dict:
        """Counters for metrics: hits, misses, evictions (LRU only), bytes, load seconds total."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "bytes_in_use": self._bytes_in_use,
                "pinned_bytes": self._pinned_bytes,
                "capacity_bytes": self.capacity_bytes,
                "num_entries": len(self._entries),
                "num_pinned": sum(1 for e in self._entries.values() if e.pins),
                "load_seconds_total": self._load_seconds,
            }

    def _pin(self, key: Key, entry: _Entry) -> Any:
        if entry.pins == 0:
            self._pinned_bytes += entry.nbytes
        entry.pins += 1
        self._entries.move_to_end(key)
        return entry.value

    def _evict_down_to(self, limit: int) -> None:
        """Evict least-recently-used unpinned entries until at most `limit` bytes remain (caller checked)."""
        for key in [k for k, e in self._entries.items() if e.pins == 0]:
            if self._bytes_in_use <= limit:
                return
            self._bytes_in_use -= self._entries.pop(key).nbytes
            self._evictions += 1
