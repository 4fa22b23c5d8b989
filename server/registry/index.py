"""The in-memory index every store backend keeps: each task's latest record and highest issued version.

Thread-safe. `lock` is reentrant and public so that a backend can update state of its own together with
the index, atomically (the object store's "when did I last check this task"); it is never held during
I/O. `task_lock(task_id)` serializes one process's writers of a task, so its versions commit in order.
"""

from __future__ import annotations

import threading

from server.errors import PrefixNotFound
from server.registry.store import PrefixRecord
from server.registry.versions import advance


class TaskIndex:
    """task_id -> latest committed PrefixRecord, and -> highest version issued or seen (deleted included)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._latest: dict[str, PrefixRecord] = {}
        self._max_version: dict[str, int] = {}
        self._task_locks: dict[str, threading.Lock] = {}

    def get(self, task_id: str) -> PrefixRecord:
        """The latest committed version; PrefixNotFound if the task has none."""
        record = self.latest(task_id)
        if record is None:
            raise PrefixNotFound(f"task {task_id!r} not found")
        return record

    def latest(self, task_id: str) -> PrefixRecord | None:
        with self.lock:
            return self._latest.get(task_id)

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task, sorted by task_id."""
        with self.lock:
            return sorted(self._latest.values(), key=lambda r: r.task_id)

    def task_ids(self) -> list[str]:
        with self.lock:
            return list(self._latest)

    def max_version(self, task_id: str) -> int:
        with self.lock:
            return self._max_version.get(task_id, 0)

    def issue(self, task_id: str, version: int) -> None:
        """Record that `version` was issued to a writer (so it is never issued again)."""
        with self.lock:
            self._max_version[task_id] = max(self._max_version.get(task_id, 0), version)

    def withdraw(self, task_id: str, version: int) -> None:
        """Give back `version`, issued to a writer that failed before its commit (the caller holds the
        task's lock, so no later version was issued meanwhile)."""
        with self.lock:
            if self._max_version.get(task_id) == version:
                self._max_version[task_id] = version - 1

    def commit(self, task_id: str, record: PrefixRecord | None) -> None:
        """This process's own write: `record` is now the latest (None: the task was deleted)."""
        with self.lock:
            if record is None:
                self._latest.pop(task_id, None)
            else:
                self._latest[task_id] = record

    def take(
        self, task_id: str, found: PrefixRecord | None, max_version: int, deleted_through: float
    ) -> bool:
        """Take what a read of the store says of a task (see versions.advance: never back); whether the
        task's latest record changed."""
        with self.lock:
            before = self._latest.get(task_id)
            after = advance(before, found, deleted_through)
            if after is None:
                self._latest.pop(task_id, None)
            else:
                self._latest[task_id] = after
            self._max_version[task_id] = max(self._max_version.get(task_id, 0), max_version)
            return after != before

    def replace(self, latest: dict[str, PrefixRecord], max_version: dict[str, int]) -> None:
        """The whole index at once (a recovery of a store this process is the only writer of)."""
        with self.lock:
            self._latest, self._max_version = dict(latest), dict(max_version)

    def task_lock(self, task_id: str) -> threading.Lock:
        with self.lock:
            return self._task_locks.setdefault(task_id, threading.Lock())
