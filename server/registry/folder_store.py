"""The prefix store in a folder this server alone writes: atomic writes, versions, restart recovery.

Layout under `root`: tasks/<task_id>/v<version>.safetensors, then v<version>.json (the metadata, written
last: it is the commit marker), and deleted.json (a tombstone: versions up to `deleted_through` are gone
and never issued again). See versions.py for the rules every backend shares.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from server.errors import InsufficientStorage, PrefixServerError, StoreReadOnly
from server.registry import versions
from server.registry.index import TaskIndex
from server.registry.store import (
    PrefixRecord,
    check_source,
    check_version_bytes,
    is_task_id,
    metadata_bytes,
    record_for,
    validate_task_id,
    verified,
)

logger = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # read-only mount, permissions


class FolderStore:
    """PrefixStore over the folder `root`, whose only writer this process is; its index lives in memory.
    `on_change` is never called: nobody else changes the folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.on_change: Callable[[str], object] | None = None
        self.index = TaskIndex()

    def get(self, task_id: str) -> PrefixRecord:
        return self.index.get(validate_task_id(task_id))

    def list(self) -> list[PrefixRecord]:
        return self.index.list()

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        validate_task_id(task_id)
        check_source(source)
        folder = self.tasks_dir / task_id
        with self.index.task_lock(task_id):
            version = self.index.max_version(task_id) + 1
            data = encode(version)  # may raise: nothing is written yet
            record = record_for(task_id, version, data, num_virtual_tokens, source)
            self.index.issue(task_id, version)
            new_folder = not folder.is_dir()
            with storage_errors(self.root, f"the upload of {task_id!r}"):
                try:
                    if new_folder:  # a new folder's entry (and tasks/'s) must survive a crash too
                        folder.mkdir(parents=True)
                        for parent in (self.tasks_dir, self.root):
                            fsync_dir(parent)
                    _write_atomic(folder / f"v{version}.safetensors", data)
                    _write_atomic(folder / f"v{version}.json", metadata_bytes(record))
                except BaseException:
                    self._abandon(task_id, version, folder, new_folder)  # never committed, never visible
                    raise
            self.index.commit(task_id, record)
            self._cleanup(folder, set(versions.version_files(os.listdir(folder))) - {version})
        return record

    def delete(self, task_id: str) -> PrefixRecord:
        validate_task_id(task_id)
        folder = self.tasks_dir / task_id
        with self.index.task_lock(task_id):
            record = self.get(task_id)
            through = self.index.max_version(task_id)
            tombstone = {"task_id": task_id, "deleted_through": through, "deleted_at": time.time()}
            # Durable before any file goes, so a crash mid-delete cannot resurrect the task.
            with storage_errors(self.root, f"the delete of {task_id!r}"):
                _write_atomic(folder / versions.TOMBSTONE, json.dumps(tombstone).encode())
            self.index.commit(task_id, None)
            self._cleanup(folder, versions.version_files(os.listdir(folder)))
        return record

    def known(self, task_id: str) -> bool:
        return (self.tasks_dir / validate_task_id(task_id)).exists()

    def read(self, record: PrefixRecord) -> bytes:
        validate_task_id(record.task_id)
        return verified(
            record, (self.tasks_dir / record.task_id / f"v{record.version}.safetensors").read_bytes()
        )

    def recover(self) -> list[str]:
        """Rebuild the index from disk, cleaning up leftovers; returns the warnings (the opener logs them)."""
        warnings: list[str] = []
        latest: dict[str, PrefixRecord] = {}
        max_version: dict[str, int] = {}
        folders = sorted(self.tasks_dir.iterdir()) if self.tasks_dir.is_dir() else []
        for folder in folders:
            if not (is_task_id(folder.name) and folder.is_dir()):
                warnings.append(f"ignored {folder}: not a folder named by a valid task id")
                continue
            record, max_version[folder.name], _ = self.read_task(folder.name, warnings)
            if record is not None:
                latest[folder.name] = record
        self.index.replace(latest, max_version)
        return warnings

    def read_task(
        self, task_id: str, warnings: list[str], cleanup: bool = True
    ) -> tuple[PrefixRecord | None, int, int]:
        """(latest valid committed record or None, highest version ever issued, highest deleted version)
        of one task's folder; `cleanup` removes temp files and versions that can never be served."""
        folder = self.tasks_dir / task_id
        names = sorted(os.listdir(folder))
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                if cleanup:  # an interrupted atomic write; its target was never replaced
                    try:
                        (folder / name).unlink(missing_ok=True)
                        warnings.append(f"removed leftover temp file {folder / name}")
                    except OSError as e:  # a read-only store: never read anyway
                        warnings.append(f"left temp file {folder / name} ({e.strerror})")
            elif not versions.VERSION_FILE_RE.fullmatch(name) and name != versions.TOMBSTONE:
                warnings.append(f"ignored unexpected file {folder / name}")
        kinds = versions.version_files(names)
        deleted_through = _read_tombstone(folder, max(kinds, default=0), warnings)
        record, skipped = versions.newest_whole(kinds, deleted_through, lambda v: _read_version(folder, v))
        warnings += [f"skipped {folder / f'v{v}'}.*: {problem}" for v, problem in skipped]
        # Finish an interrupted delete or post-commit cleanup; newer broken files stay for inspection.
        if cleanup:
            served = None if record is None else record.version
            try:
                _unlink_versions(folder, versions.removable(kinds, served, deleted_through))
            except OSError as e:  # a read-only store: what is left is never served, the next recovery retries
                warnings.append(f"left old versions in {folder} ({e.strerror})")
        return record, versions.highest_issued(kinds, deleted_through), deleted_through

    def _abandon(self, task_id: str, version: int, folder: Path, new_folder: bool) -> None:
        """Undo a put that failed before its commit: its files, its folder if new, its version number."""
        with contextlib.suppress(OSError):  # a store that cannot write may not unlink either
            _unlink_versions(folder, [version])
            if new_folder:
                folder.rmdir()  # only if empty
        self.index.withdraw(task_id, version)

    def _cleanup(self, folder: Path, old: Iterable[int]) -> None:
        """Remove superseded or deleted versions after a commit; a failure leaves them to recovery,
        since the commit itself stands (they are never served: the index names the newer state)."""
        try:
            _unlink_versions(folder, old)
        except OSError as e:
            logger.warning("prefix store: could not remove old files in %s (%s); recovery will", folder, e)


@contextlib.contextmanager
def storage_errors(root: Path, what: str) -> Iterator[None]:
    """A write under `root` that fails for lack of space or permission raises its domain error (507 /
    503, naming `what`); any other error passes through."""
    try:
        yield
    except OSError as e:
        if (error := _storage_error(e, root, what)) is None:
            raise
        raise error from e


def _storage_error(e: BaseException, root: Path, what: str) -> PrefixServerError | None:
    """The domain error for a failed write under `root` (no space, not writable), else None."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return InsufficientStorage(
            f"prefix store {root} is out of space ({e.strerror}): {what} was not stored; "
            "the stored prefixes are unchanged"
        )
    if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
        return StoreReadOnly(
            f"prefix store {root} is not writable ({e.strerror}): {what} was refused and nothing changed; "
            "uploads and deletes fail until it is writable, generation goes on"
        )
    return None


def _read_version(folder: Path, version: int) -> tuple[PrefixRecord | None, str]:
    """(record, "") if a committed version's files are whole and agree, else (None, what is wrong)."""
    try:
        metadata = (folder / f"v{version}.json").read_bytes()
        data = (folder / f"v{version}.safetensors").read_bytes()
    except OSError as e:
        return None, f"unreadable ({e})"
    return check_version_bytes(folder.name, version, metadata, data)


def _read_tombstone(folder: Path, newest_on_disk: int, warnings: list[str]) -> int:
    """Highest deleted version (0 if never deleted); an unreadable tombstone deletes everything present."""
    path = folder / versions.TOMBSTONE
    if not path.exists():
        return 0
    try:
        through = json.loads(path.read_bytes())["deleted_through"]
        if isinstance(through, int) and not isinstance(through, bool) and through >= 0:
            return through
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Serving a task its owner deleted is worse than losing one that was re-uploaded.
    warnings.append(f"unreadable tombstone {path}: deleting versions up to {newest_on_disk}")
    return newest_on_disk


def _unlink_versions(folder: Path, old: Iterable[int]) -> None:
    """Remove versions' files, each .json (commit marker) before its .safetensors."""
    old = list(old)
    for version in old:
        for name in versions.file_names(version):
            (folder / name).unlink(missing_ok=True)
    if old:
        fsync_dir(folder)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over `path`, fsync the folder: all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the folder's own entry list)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
