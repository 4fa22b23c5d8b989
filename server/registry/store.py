"""On-disk prefix store: one folder per task, versioned files, atomic writes, restart recovery.

Layout under `root`: tasks/<task_id>/v<version>.safetensors, then v<version>.json (the metadata, written
last: it is the commit marker), and deleted.json (a tombstone: versions up to `deleted_through` are gone
and never issued again). Plain bytes and files; the registry does the tensor work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.errors import (
    InsufficientStorage,
    InvalidRequest,
    PrefixFormatError,
    PrefixNotFound,
    PrefixServerError,
    StoreReadOnly,
)
from server.registry.format import read_metadata
from server.registry.frame import TaskFrame

logger = logging.getLogger(__name__)

TASK_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, and not '.' or '..'"
# Stored ids may carry a tenant namespace, "tenant~task" (tenant: 1-32 of A-Z a-z 0-9 _ -); see api/auth.py.
_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
SOURCES = ("native", "peft", "text")
_TASK_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_FILE_RE = re.compile(r"v([1-9][0-9]*)\.(safetensors|json)")
_TOMBSTONE = "deleted.json"
_JSON_TYPES = {"str": str, "int": int, "float": (int, float)}  # field annotation -> accepted JSON types
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # read-only mount, permissions


def is_task_id(name: object) -> bool:
    """Whether `name` is a valid (optionally tenant-namespaced) task id, hence a safe folder name."""
    if not isinstance(name, str):
        return False
    tenant, sep, task = name.rpartition("~")
    if sep and not _TENANT_RE.fullmatch(tenant):
        return False
    return bool(_TASK_ID_RE.fullmatch(task)) and task not in (".", "..")


def validate_task_id(task_id: object) -> str:
    """Return task_id if it is a valid task id, else raise InvalidRequest naming the rule."""
    if not is_task_id(task_id):
        raise InvalidRequest(f"task_id must be {TASK_ID_RULE}; got {task_id!r:.80}")
    return task_id


@dataclass(frozen=True)
class PrefixRecord:
    """One committed version of a task's prefix, as stored in v<version>.json."""

    task_id: str
    version: int
    sha256: str  # hex digest of the .safetensors file
    num_virtual_tokens: int
    bytes: int  # size of the .safetensors file
    created_at: float  # unix seconds
    source: str  # "native" | "peft" | "text"
    # The task's prompt frame, read from the file's metadata (the file is its one source of truth).
    frame: TaskFrame | None = None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "frame": None if self.frame is None else self.frame.to_dict()}

    @classmethod
    def from_dict(cls, d: object) -> PrefixRecord:
        """Parse `to_dict` output; ValueError naming the first missing or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"metadata is a JSON {type(d).__name__}, expected an object")
        # f.type is a string: annotations are postponed. The frame is not read here: it comes from
        # the file's own metadata (`frame_of`).
        fields = [f for f in dataclasses.fields(cls) if f.name != "frame"]
        for f in fields:
            value = d.get(f.name)
            if not isinstance(value, _JSON_TYPES[f.type]) or isinstance(value, bool):
                raise ValueError(f"metadata field {f.name}={value!r:.40}, expected {f.type}")
        if d["source"] not in SOURCES:
            raise ValueError(f"metadata source={d['source']!r:.40}, expected one of {SOURCES}")
        return cls(**{f.name: d[f.name] for f in fields})


class PrefixStore:
    """Versioned prefix files under `root`; thread-safe. Call `recover()` once, at startup, before use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self._lock = threading.Lock()  # guards the dicts below; never held during file I/O
        self._latest: dict[str, PrefixRecord] = {}
        self._max_version: dict[str, int] = {}  # highest version issued or seen on disk, deleted included
        self._task_locks: dict[str, threading.Lock] = {}  # one writer per task, so versions commit in order

    def get(self, task_id: str) -> PrefixRecord:
        """The latest committed version; PrefixNotFound if the task has none."""
        validate_task_id(task_id)
        with self._lock:
            record = self._latest.get(task_id)
        if record is None:
            raise PrefixNotFound(f"task {task_id!r} not found")
        return record

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task, sorted by task_id."""
        with self._lock:
            return sorted(self._latest.values(), key=lambda r: r.task_id)

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        """Commit a new version whose file is `encode(version)`; older versions' files are then removed."""
        validate_task_id(task_id)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        folder = self.tasks_dir / task_id
        with self._task_lock(task_id):
            with self._lock:
                version = self._max_version.get(task_id, 0) + 1
            data = encode(version)  # may raise: nothing is written yet
            sha256 = hashlib.sha256(data).hexdigest()
            record = PrefixRecord(
                task_id, version, sha256, num_virtual_tokens, len(data), time.time(), source, frame_of(data)
            )
            with self._lock:
                self._max_version[task_id] = version
            new_folder = not folder.is_dir()
            with storage_errors(self.root, f"the upload of {task_id!r}"):
                try:
                    if new_folder:  # a new folder's entry (and tasks/'s) must survive a crash too
                        folder.mkdir(parents=True)
                        for parent in (self.tasks_dir, self.root):
                            _fsync_dir(parent)
                    _write_atomic(folder / f"v{version}.safetensors", data)
                    _write_atomic(
                        folder / f"v{version}.json", json.dumps(record.to_dict(), indent=1).encode()
                    )
                except BaseException:
                    self._abandon(task_id, version, folder, new_folder)  # never committed, never visible
                    raise
            with self._lock:
                self._latest[task_id] = record
            self._cleanup(folder, _versions_on_disk(folder) - {version})
        return record

    def delete(self, task_id: str) -> PrefixRecord:
        """Remove a task's files; its tombstone keeps the deleted versions from ever being issued again."""
        validate_task_id(task_id)
        folder = self.tasks_dir / task_id
        with self._task_lock(task_id):
            record = self.get(task_id)
            with self._lock:
                through = self._max_version[task_id]
            tombstone = {"task_id": task_id, "deleted_through": through, "deleted_at": time.time()}
            # Durable before any file goes, so a crash mid-delete cannot resurrect the task.
            with storage_errors(self.root, f"the delete of {task_id!r}"):
                _write_atomic(folder / _TOMBSTONE, json.dumps(tombstone).encode())
            with self._lock:
                del self._latest[task_id]
            self._cleanup(folder, _versions_on_disk(folder))
        return record

    def known(self, task_id: str) -> bool:
        """Whether the task has, or ever had, anything stored (a version, a tombstone, a half upload)."""
        return (self.tasks_dir / validate_task_id(task_id)).exists()

    def read(self, record: PrefixRecord) -> bytes:
        """The file of `record`, checked against its sha256; FileNotFoundError once superseded or deleted."""
        validate_task_id(record.task_id)
        return verified(
            record, (self.tasks_dir / record.task_id / f"v{record.version}.safetensors").read_bytes()
        )

    def recover(self) -> list[str]:
        """Rebuild the index from disk (latest valid committed version per task); returns the warnings logged."""
        warnings: list[str] = []
        latest: dict[str, PrefixRecord] = {}
        max_version: dict[str, int] = {}
        folders = sorted(self.tasks_dir.iterdir()) if self.tasks_dir.is_dir() else []
        for folder in folders:
            if not (is_task_id(folder.name) and folder.is_dir()):
                warnings.append(f"ignored {folder}: not a folder named by a valid task id")
                continue
            record, max_version[folder.name], _ = self._recover_task(folder, warnings)
            if record is not None:
                latest[folder.name] = record
        with self._lock:
            self._latest, self._max_version = latest, max_version
        for line in warnings:
            logger.warning("prefix store: %s", line)
        return warnings

    def refresh(self, task_id: str, *, cleanup: bool = False) -> list[str]:
        """Re-read one task from disk, for a root that other processes write too (server/distributed).

        Touches no file unless `cleanup` (the caller then holds the task's cross-process lock), and never
        moves a task back to an older version: versions only grow, so an older one means this scan raced
        a newer commit. Returns the warnings (logged only with `cleanup`: otherwise they are live writes).
        """
        validate_task_id(task_id)
        folder = self.tasks_dir / task_id
        if not folder.is_dir():
            return []
        warnings: list[str] = []
        record, max_version, deleted_through = self._recover_task(folder, warnings, cleanup=cleanup)
        with self._lock:
            current = self._latest.get(task_id)
            if record is not None and (current is None or record.version > current.version):
                self._latest[task_id] = record
            elif current is not None and deleted_through >= current.version:
                del self._latest[task_id]
            self._max_version[task_id] = max(self._max_version.get(task_id, 0), max_version)
        for line in warnings if cleanup else ():
            logger.warning("prefix store: %s", line)
        return warnings

    def _recover_task(
        self, folder: Path, warnings: list[str], cleanup: bool = True
    ) -> tuple[PrefixRecord | None, int, int]:
        """(latest valid committed record or None, highest version ever issued, highest deleted version)
        for one task folder; `cleanup` removes temp files and versions that can never be served."""
        kinds: dict[int, set[str]] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if cleanup:  # an interrupted atomic write; its target was never replaced
                    try:
                        path.unlink(missing_ok=True)
                        warnings.append(f"removed leftover temp file {path}")
                    except OSError as e:  # a read-only store: never read anyway
                        warnings.append(f"left temp file {path} ({e.strerror})")
            elif m := _VERSION_FILE_RE.fullmatch(path.name):
                kinds.setdefault(int(m[1]), set()).add(m[2])
            elif path.name != _TOMBSTONE:
                warnings.append(f"ignored unexpected file {path}")
        deleted_through = _read_tombstone(folder, max(kinds, default=0), warnings)
        record = None
        for version in sorted((v for v in kinds if v > deleted_through), reverse=True):
            record, problem = _check_version(folder, version, kinds[version])
            if record is not None:
                break
            warnings.append(f"skipped {folder / f'v{version}'}.*: {problem}")
        # Finish an interrupted delete or post-commit cleanup; newer broken files stay for inspection.
        keep_above = record.version if record is not None else deleted_through
        if cleanup:
            try:
                _unlink_versions(folder, [v for v in kinds if v < keep_above or v <= deleted_through])
            except OSError as e:  # a read-only store: what is left is never served, the next recovery retries
                warnings.append(f"left old versions in {folder} ({e.strerror})")
        return record, max(deleted_through, *kinds, 0), deleted_through

    def _task_lock(self, task_id: str) -> threading.Lock:
        with self._lock:
            return self._task_locks.setdefault(task_id, threading.Lock())

    def _abandon(self, task_id: str, version: int, folder: Path, new_folder: bool) -> None:
        """Undo a put that failed before its commit: its files, its folder if new, its version number
        (the caller holds the task's lock, so no later version was issued meanwhile)."""
        with contextlib.suppress(OSError):  # a store that cannot write may not unlink either
            _unlink_versions(folder, [version])
            if new_folder:
                folder.rmdir()  # only if empty
        with self._lock:
            if self._max_version.get(task_id) == version:
                self._max_version[task_id] = version - 1

    def _cleanup(self, folder: Path, versions: Iterable[int]) -> None:
        """Remove superseded or deleted versions after a commit; a failure leaves them to recovery,
        since the commit itself stands (they are never served: the index names the newer state)."""
        try:
            _unlink_versions(folder, versions)
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


def verified(record: PrefixRecord, data: bytes) -> bytes:
    """`data` if its sha256 is the one `record` says, else PrefixServerError naming both."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise PrefixServerError(
            f"stored prefix {record.task_id!r} v{record.version} is corrupt: "
            f"sha256 {digest}, metadata says {record.sha256}"
        )
    return data


def _check_version(folder: Path, version: int, kinds: set[str]) -> tuple[PrefixRecord | None, str]:
    """(record, "") if one committed version's files are whole and agree, else (None, what is wrong)."""
    if "json" not in kinds:
        return None, f"no v{version}.json (upload never committed)"
    if "safetensors" not in kinds:
        return None, f"v{version}.json has no v{version}.safetensors"
    try:
        metadata = (folder / f"v{version}.json").read_bytes()
        data = (folder / f"v{version}.safetensors").read_bytes()
    except OSError as e:
        return None, f"unreadable ({e})"
    return check_version_bytes(folder.name, version, metadata, data)


def check_version_bytes(
    task_id: str, version: int, metadata: bytes, data: bytes
) -> tuple[PrefixRecord | None, str]:
    """(record, "") if a version's v<N>.json bytes and .safetensors bytes are whole and agree, else
    (None, what is wrong). Shared with the object store (s3_store.py)."""
    try:
        record = PrefixRecord.from_dict(json.loads(metadata))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"unreadable ({e})"
    if (record.task_id, record.version) != (task_id, version):
        return None, f"metadata names {record.task_id!r} v{record.version}"
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) != (record.bytes, record.sha256):
        return None, (
            f"file has {len(data)} bytes, sha256 {digest[:16]}..., "
            f"metadata says {record.bytes} bytes, sha256 {record.sha256[:16]}..."
        )
    try:
        frame = frame_of(data)
    except PrefixFormatError as e:
        return None, str(e)
    return dataclasses.replace(record, frame=frame), ""


def frame_of(data: bytes) -> TaskFrame | None:
    """The prompt frame in a prefix file's metadata, None if it has none; PrefixFormatError if unreadable."""
    return TaskFrame.from_metadata(read_metadata(data))


def _read_tombstone(folder: Path, newest_on_disk: int, warnings: list[str]) -> int:
    """Highest deleted version (0 if never deleted); an unreadable tombstone deletes everything present."""
    path = folder / _TOMBSTONE
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


def _versions_on_disk(folder: Path) -> set[int]:
    return {int(m[1]) for p in folder.iterdir() if (m := _VERSION_FILE_RE.fullmatch(p.name))}


def _unlink_versions(folder: Path, versions: Iterable[int]) -> None:
    """Remove versions' files, each .json (commit marker) before its .safetensors."""
    versions = list(versions)
    for version in versions:
        for suffix in ("json", "safetensors"):
            (folder / f"v{version}.{suffix}").unlink(missing_ok=True)
    if versions:
        _fsync_dir(folder)


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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
