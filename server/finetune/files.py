"""Fine-tuning files on disk (OpenAI's Files API, purpose "fine-tune"), each owned by one tenant.

Layout under `root` (the server's --fine-tune-dir + "/files"):

    <owner>/<file id>/data.jsonl   the bytes as uploaded
    <owner>/<file id>/meta.json    the FileRecord: {id, object, bytes, created_at, filename, purpose,
                                   status, status_details, shape, num_examples, owner, created_ns}

A file's folder appears whole or not at all: both files are written and fsynced in a temporary folder
(<owner>/.upload-*.tmp), which is then renamed into place; a delete renames the folder away
(<owner>/.delete-*.tmp) before removing it. A process killed at any point leaves at most a temporary
folder, which nothing reads and `recover` removes. Nothing is kept in memory: every call reads the disk, so
the store needs no index to rebuild and survives a restart as it is. The folder is one server's (as
--prefix-dir's folder store is): `recover` would remove another server's uploads in progress.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from server.errors import (
    FileNotFound,
    InsufficientStorage,
    InvalidRequest,
    PayloadTooLarge,
    QuotaExceeded,
    StoreReadOnly,
    shown,
)
from server.finetune.training_file import parse_training_file
from server.registry.folder_store import fsync_dir
from server.training.data import Example

log = logging.getLogger(__name__)

SHARED_OWNER = "@shared"  # the owner of open mode's and admins' files ('@' is in no tenant name)
OWNER_RE = re.compile(r"@shared|[A-Za-z0-9_-]{1,32}")  # api/auth.py's tenant names, or the shared owner
FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")
PURPOSES = ("fine-tune",)
_TEMP_RE = re.compile(r"\.(upload|delete)-.*\.tmp")


@dataclass(frozen=True)
class FileRecord:
    """One stored file: OpenAI's File object, plus what its lines are (shape, num_examples) and whose."""

    id: str
    bytes: int
    created_at: int  # unix seconds, as OpenAI shows it
    filename: str
    purpose: str
    shape: str  # training_file.PROMPT_COMPLETION or CHAT
    num_examples: int
    owner: str
    created_ns: int  # time.time_ns() at upload: orders files created within one second

    def meta(self) -> dict:
        """meta.json's content."""
        return {"object": "file", "status": "processed", "status_details": None, **asdict(self)}


class FileStore:
    """The files under `root`; every method takes the owner (a tenant, or SHARED_OWNER), and another
    owner's file is not found, never forbidden. Safe for concurrent calls from many threads."""

    def __init__(self, root: Path, *, max_file_bytes: int, max_bytes_per_owner: int) -> None:
        self.root = Path(root)
        self.max_file_bytes = max_file_bytes
        self.max_bytes_per_owner = max_bytes_per_owner  # 0 = unlimited
        self._lock = threading.Lock()
        self._owner_locks: dict[str, threading.Lock] = {}

    def create(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        """Check `data` (parse_training_file: TrainingDataError naming the line) and the owner's quota
        (QuotaExceeded), then store it; nothing is stored unless all of it is."""
        folder = self._owner_dir(owner)
        if purpose not in PURPOSES:  # the routes check first; this is the store's own guard
            raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
        if len(data) > self.max_file_bytes:  # the routes check first, while the body streams in
            raise PayloadTooLarge(
                f"file is {len(data)} bytes, larger than the limit of {self.max_file_bytes}"
            )
        examples, shape = parse_training_file(data)
        now = time.time_ns()
        record = FileRecord(
            id=f"file-{secrets.token_hex(12)}",
            bytes=len(data),
            created_at=now // 10**9,
            filename=filename,
            purpose=purpose,
            shape=shape,
            num_examples=len(examples),
            owner=owner,
            created_ns=now,
        )
        with self._owner_lock(owner), _storage_errors(self.root, "the upload"):
            used = self.bytes_used(owner)
            if self.max_bytes_per_owner and used + len(data) > self.max_bytes_per_owner:
                raise QuotaExceeded(
                    f"quota: {_whose(owner)} would take {used + len(data)} bytes, the limit is "
                    f"{self.max_bytes_per_owner} (stored: {used}; delete files to make room)"
                )
            if not folder.is_dir():  # a new folder's entry must survive a crash too
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)
            temp = Path(tempfile.mkdtemp(dir=folder, prefix=".upload-", suffix=".tmp"))
            try:
                _write(temp / "data.jsonl", data)
                _write(temp / "meta.json", json.dumps(record.meta()).encode())
                fsync_dir(temp)
                os.rename(temp, folder / record.id)  # a fresh random id: nothing is there to replace
                fsync_dir(folder)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        return record

    def list(
        self,
        owner: str,
        *,
        purpose: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 10_000,
    ) -> tuple[list[FileRecord], bool]:
        """(up to `limit` of the owner's files by creation time, `order` asc or desc, those after the file
        `after` only; whether more follow). `after` must name one of the owner's files (InvalidRequest)."""
        records = sorted(self._records(owner), key=lambda r: (r.created_ns, r.id), reverse=order == "desc")
        if purpose is not None:
            records = [r for r in records if r.purpose == purpose]
        if after is not None:
            ids = [r.id for r in records]
            if after not in ids:
                raise InvalidRequest(f"after: no file {shown(after)} (deleted, or not yours)", param="after")
            records = records[ids.index(after) + 1 :]
        return records[:limit], len(records) > limit

    def get(self, owner: str, file_id: str) -> FileRecord:
        """The owner's file `file_id`, else FileNotFound."""
        record = _read_record(self._file_dir(owner, file_id), owner)
        if record is None:
            raise FileNotFound(f"no such file: {shown(file_id)}", param="file_id")
        return record

    def content(self, owner: str, file_id: str) -> bytes:
        """The bytes as uploaded."""
        self.get(owner, file_id)
        try:
            return (self._file_dir(owner, file_id) / "data.jsonl").read_bytes()
        except FileNotFoundError:  # deleted since get
            raise FileNotFound(f"no such file: {shown(file_id)}", param="file_id") from None

    def examples(self, owner: str, file_id: str) -> list[Example]:
        """The owner's file's examples, parsed again from its bytes (checked at upload); what they are
        (a chat file's prompts are user messages) is the record's `shape`."""
        return parse_training_file(self.content(owner, file_id))[0]

    def delete(self, owner: str, file_id: str) -> FileRecord:
        """Remove the owner's file; FileNotFound if there is none. Gone at once (a rename), removed after."""
        folder = self._owner_dir(owner)
        with self._owner_lock(owner), _storage_errors(self.root, "the delete"):
            record = self.get(owner, file_id)
            doomed = folder / f".delete-{file_id}.tmp"
            os.rename(folder / file_id, doomed)
            fsync_dir(folder)
        shutil.rmtree(doomed, ignore_errors=True)  # what is left is a temp folder: recover removes it
        return record

    def bytes_used(self, owner: str) -> int:
        """Bytes of the owner's stored files, as uploaded."""
        return sum(r.bytes for r in self._records(owner))

    def recover(self) -> list[str]:
        """Remove what killed uploads and deletes left (temporary folders); returns what it did and what
        it ignored, for the log. Run once at start."""
        notes: list[str] = []
        owners = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for folder in owners:
            if not (folder.is_dir() and OWNER_RE.fullmatch(folder.name)):
                notes.append(f"ignored {folder}: not an owner's folder")
                continue
            for entry in sorted(folder.iterdir()):
                if _TEMP_RE.fullmatch(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)
                    notes.append(f"removed {entry}, left by an upload or a delete that did not finish")
                elif _read_record(entry, folder.name) is None:
                    notes.append(f"ignored {entry}: not a whole file folder")
        return notes

    # ---- helpers ----
    def _owner_dir(self, owner: str) -> Path:
        if not OWNER_RE.fullmatch(owner):
            raise ValueError(f"owner must be a tenant name or {SHARED_OWNER!r}, got {owner!r}")
        return self.root / owner

    def _file_dir(self, owner: str, file_id: str) -> Path:
        if not FILE_ID_RE.fullmatch(file_id):  # never a path outside the owner's folder
            raise FileNotFound(f"no such file: {shown(file_id)}", param="file_id")
        return self._owner_dir(owner) / file_id

    def _owner_lock(self, owner: str) -> threading.Lock:
        """Serializes one owner's quota check + write, so two uploads cannot both pass the check."""
        with self._lock:
            return self._owner_locks.setdefault(owner, threading.Lock())

    def _records(self, owner: str) -> list[FileRecord]:
        folder = self._owner_dir(owner)
        names = os.listdir(folder) if folder.is_dir() else []
        records = (_read_record(folder / name, owner) for name in names if FILE_ID_RE.fullmatch(name))
        return [r for r in records if r is not None]


def _read_record(folder: Path, owner: str) -> FileRecord | None:
    """The record of a whole file folder, else None (missing, or not what this store writes)."""
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
        record = FileRecord(**{k: meta[k] for k in FileRecord.__dataclass_fields__})
        size = (folder / "data.jsonl").stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.id != folder.name or record.owner != owner or record.bytes != size:
        return None
    return record


def _whose(owner: str) -> str:
    return "the shared files" if owner == SHARED_OWNER else f"the files of tenant {owner!r}"


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # read-only mount, permissions


@contextlib.contextmanager
def _storage_errors(root: Path, what: str):
    """A write that fails for lack of space or permission: its domain error (507 / 503)."""
    try:
        yield
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise InsufficientStorage(
                f"fine-tuning file store {root} is out of space ({e.strerror}): {what} was not stored"
            ) from e
        if e.errno in _NOT_WRITABLE:
            raise StoreReadOnly(
                f"fine-tuning file store {root} is not writable ({e.strerror}): {what} was refused"
            ) from e
        raise
