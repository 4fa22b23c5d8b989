"""The prefix store's contract: `PrefixStore`, the protocol every backend follows, and what it stores.

Backends (open one with `backends.open_store(settings)`): folder_store.py (a folder this server alone
writes), shared_store.py (a folder several servers write, e.g. Ray replicas), s3_store.py (an
S3-compatible object store). Their version log is versions.py, their in-memory index index.py. Plain
bytes and records; the registry does the tensor work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.errors import InvalidRequest, PrefixFormatError, PrefixServerError
from server.registry.format import read_metadata
from server.registry.frame import TaskFrame

TASK_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, and not '.' or '..'"
# Stored ids may carry a tenant namespace, "tenant~task" (tenant: 1-32 of A-Z a-z 0-9 _ -); see api/auth.py.
_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
SOURCES = ("native", "peft", "text")
_TASK_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_JSON_TYPES = {"str": str, "int": int, "float": (int, float)}  # field annotation -> accepted JSON types


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


class PrefixStore(Protocol):
    """Versioned prefix files of every task; thread-safe. Call `recover()` once, at startup, before use.

    `on_change(task_id)`, when set, runs when the store finds a task changed by another server (the
    registry then drops the superseded tensors from its cache); a store only this server writes never
    calls it.
    """

    root: Path | str  # where the files are (a folder, or an s3:// URL), for messages
    on_change: Callable[[str], object] | None

    def get(self, task_id: str) -> PrefixRecord:
        """The latest committed version; PrefixNotFound if the task has none."""
        ...

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task, sorted by task_id."""
        ...

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        """Commit a new version whose file is `encode(version)`; older versions' files are then removed."""
        ...

    def delete(self, task_id: str) -> PrefixRecord:
        """Remove a task's files; its tombstone keeps the deleted versions from ever being issued again."""
        ...

    def known(self, task_id: str) -> bool:
        """Whether the task has, or ever had, anything stored (a version, a tombstone, a half upload)."""
        ...

    def read(self, record: PrefixRecord) -> bytes:
        """The file of `record`, checked against its sha256; FileNotFoundError once superseded or deleted."""
        ...

    def recover(self) -> list[str]:
        """Build the index from the stored files (latest valid committed version per task), removing only
        what can never be served; returns the warnings."""
        ...


def check_source(source: str) -> None:
    """ValueError unless `source` is one of SOURCES (a caller's bug, not a client's)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def record_for(task_id: str, version: int, data: bytes, num_virtual_tokens: int, source: str) -> PrefixRecord:
    """The record of a version about to be written, whose file is `data`."""
    sha256 = hashlib.sha256(data).hexdigest()
    return PrefixRecord(
        task_id, version, sha256, num_virtual_tokens, len(data), time.time(), source, frame_of(data)
    )


def metadata_bytes(record: PrefixRecord) -> bytes:
    """The v<version>.json of `record` (its commit marker)."""
    return json.dumps(record.to_dict(), indent=1).encode()


def verified(record: PrefixRecord, data: bytes) -> bytes:
    """`data` if its sha256 is the one `record` says, else PrefixServerError naming both."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise PrefixServerError(
            f"stored prefix {record.task_id!r} v{record.version} is corrupt: "
            f"sha256 {digest}, metadata says {record.sha256}"
        )
    return data


def check_version_bytes(
    task_id: str, version: int, metadata: bytes, data: bytes
) -> tuple[PrefixRecord | None, str]:
    """(record, "") if a version's v<N>.json bytes and .safetensors bytes are whole and agree, else
    (None, what is wrong)."""
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
