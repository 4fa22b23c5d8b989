"""The prefix store over a folder that several servers (Ray replicas, processes, machines) write at once.

The folder store keeps its index in memory and is its folder's only writer. Here every server has its
own index over the same folder, so:
- a read (`get`, `list`) lists the task's folder first (one `listdir`, microseconds) and re-reads the
  task from disk only when the listing changed: an upload or delete made by any server is seen by the
  next request on every server, so hot swap keeps its single-server meaning;
- a write (`put`, `delete`) holds the task's cross-process lock (`flock` on locks/<task_id>.lock) and
  re-reads the task first, so two servers never issue the same version;
- recovery cleans a task's leftovers only under that lock, so it never removes a live upload's temp file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from server.errors import StoreReadOnly
from server.registry.folder_store import FolderStore, storage_errors
from server.registry.store import PrefixRecord, is_task_id, validate_task_id

_LOCKS = "locks"


class SharedFolderStore(FolderStore):
    """FolderStore whose index follows the folder; `on_change(task_id)` runs when another server's
    upload or delete changed a task (the registry drops the superseded tensors from its cache)."""

    def __init__(self, root: Path, on_change: Callable[[str], object] | None = None) -> None:
        super().__init__(root)
        self.on_change = on_change
        self._listings: dict[str, frozenset[str]] = {}  # task -> its folder's names when last read

    def recover(self) -> list[str]:
        """Read every task from disk, cleaning up each one's leftovers under its lock."""
        warnings: list[str] = []
        for task_id in self._task_ids_on_disk():
            try:
                with self.task_file_lock(task_id):
                    listing = self._listing(task_id)
                    warnings += self.refresh(task_id, cleanup=True)
                    self._listings[task_id] = listing
            except StoreReadOnly:  # no lock file can be made: read the task, clean nothing
                listing = self._listing(task_id)
                warnings += self.refresh(task_id)
                self._listings[task_id] = listing
        return warnings

    def get(self, task_id: str) -> PrefixRecord:
        self.sync(task_id)
        return super().get(task_id)

    def list(self) -> list[PrefixRecord]:
        for task_id in self._task_ids_on_disk():
            self.sync(task_id)
        return super().list()

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        validate_task_id(task_id)
        with self.task_file_lock(task_id):
            self.refresh(task_id)  # the versions other servers issued
            record = super().put(task_id, encode, num_virtual_tokens=num_virtual_tokens, source=source)
            self._listings[task_id] = self._listing(task_id)  # no other writer can change it under the lock
        return record

    def delete(self, task_id: str) -> PrefixRecord:
        validate_task_id(task_id)
        with self.task_file_lock(task_id):
            self.refresh(task_id)
            record = super().delete(task_id)
            self._listings[task_id] = self._listing(task_id)
        return record

    def refresh(self, task_id: str, *, cleanup: bool = False) -> list[str]:
        """Re-read one task from disk into the index (only forward: see versions.advance).

        Touches no file unless `cleanup` (the caller then holds the task's cross-process lock). Returns
        the warnings, unlogged: without `cleanup` they may be live writes, with it (`recover`) the store's
        opener logs them.
        """
        validate_task_id(task_id)
        if not (self.tasks_dir / task_id).is_dir():
            return []
        warnings: list[str] = []
        record, max_version, deleted_through = self.read_task(task_id, warnings, cleanup=cleanup)
        self.index.take(task_id, record, max_version, deleted_through)
        return warnings

    def sync(self, task_id: str) -> None:
        """Re-read the task if its folder changed since the last read (cheap when it did not)."""
        validate_task_id(task_id)
        listing = self._listing(task_id)
        if self._listings.get(task_id) == listing:
            return
        before = self.index.latest(task_id)
        self.refresh(task_id)
        if listing:  # (no entry for ids that were never stored: a flood of unknown ids costs nothing)
            # The listing from before the scan: a change during the scan makes the next call scan again.
            self._listings[task_id] = listing
        if self.on_change is not None and self.index.latest(task_id) != before:
            self.on_change(task_id)

    @contextlib.contextmanager
    def task_file_lock(self, task_id: str) -> Iterator[None]:
        """Exclusive across processes (and threads: each call opens its own file description)."""
        folder = self.root / _LOCKS
        with storage_errors(self.root, f"a write to {task_id!r}"):  # 507 / 503, as the folder's writes
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / f"{task_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _listing(self, task_id: str) -> frozenset[str]:
        try:
            return frozenset(os.listdir(self.tasks_dir / task_id))
        except FileNotFoundError:
            return frozenset()

    def _task_ids_on_disk(self) -> list[str]:
        try:
            names = os.listdir(self.tasks_dir)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_task_id(name))
