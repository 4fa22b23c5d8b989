"""The prefix store in an S3-compatible object store (AWS S3, MinIO, ...), shared by every server.

Keys under s3://bucket/<key prefix>/tasks/<task_id>/: the folder store's v<N>.safetensors, then v<N>.json
(the commit marker); deleted-<N>.json, a tombstone ("versions up to N are gone"; one key per delete, so
deletes never overwrite one another); latest.json, a change marker rewritten after every commit and
delete, whose ETag readers compare.

- Versions: a writer lists the task and creates v<N>.safetensors, then v<N>.json, each with a
  conditional put (If-None-Match: *); a 412 means another writer has that version: it takes the next.
  A commit that a newer version or a tombstone got ahead of (a slow writer whose version a cleanup
  freed) is withdrawn and retried higher. So no version is issued twice, none hides behind an older one.
- Freshness: each server keeps an index; a lookup more than `ttl_s` after the last check of its task
  HEADs latest.json and, only when its ETag changed, lists the task and reads its newest committed
  version (json, file, sha256). So a new version reaches every server within `ttl_s` of the upload.
- A corrupt or partial version is skipped, with a log line, for the next older whole one.
- An unreachable store (s3_bucket.py bounds every call): lookups of a task the index knows serve what it
  knows; of one it does not, and every write, fail with StoreUnavailable (503), never a guessed "not
  found". A write that fails before its commit leaves nothing any reader takes for a version; once
  committed, it stands even if rewriting latest.json fails (other servers then find it by listing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable

from server.errors import PrefixNotFound, PrefixServerError, StoreUnavailable
from server.registry.s3_bucket import Listing, TaskObjects
from server.registry.store import (
    SOURCES,
    PrefixRecord,
    check_version_bytes,
    frame_of,
    validate_task_id,
    verified,
)

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"v([1-9][0-9]*)\.(safetensors|json)")
_TOMBSTONE_RE = re.compile(r"deleted-([0-9]+)\.json")
_MARKER = "latest.json"
_ATTEMPTS = 100  # versions one put tries before it gives up (only under heavy contention on one task)
_STALE = "(stale)"  # an ETag no real one equals: the next lookup lists the task
_MAX_ABSENT = 10_000  # unknown ids remembered (for `ttl_s`), so a flood of them costs one HEAD per TTL


class S3PrefixStore:
    """PrefixStore's interface over a bucket; thread-safe. `on_change(task_id)` runs when a check finds
    a task changed by another server (the registry then drops the superseded tensors)."""

    def __init__(
        self, objects: TaskObjects, *, ttl_s: float = 1.0, on_change: Callable[[str], object] | None = None
    ) -> None:
        self.objects, self.root = objects, objects.url
        self.ttl_s, self.on_change = ttl_s, on_change
        self._writer = uuid.uuid4().hex  # in latest.json, so that every write changes its ETag
        self._lock = threading.Lock()  # guards the dicts below; never held during a request to the store
        self._latest: dict[str, PrefixRecord] = {}
        self._max_version: dict[str, int] = {}  # highest version issued or seen, deleted included
        self._seen: dict[str, tuple[str | None, float]] = {}  # task -> (latest.json ETag, when checked)
        self._absent: dict[str, float] = {}  # ids with no object -> when checked
        self._listed_at = -math.inf
        self._task_locks: dict[str, threading.Lock] = {}

    @classmethod
    def from_url(cls, url: str, *, ttl_s: float = 1.0) -> S3PrefixStore:
        """A store over s3://bucket[/key/prefix]; PrefixServerError naming the URL if the bucket fails."""
        return cls(TaskObjects.connect(url), ttl_s=ttl_s)

    def get(self, task_id: str) -> PrefixRecord:
        """The latest committed version, as of a check at most `ttl_s` old; PrefixNotFound if none."""
        self._sync(validate_task_id(task_id))
        with self._lock:
            record = self._latest.get(task_id)
        if record is None:
            raise PrefixNotFound(f"task {task_id!r} not found")
        return record

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task (the bucket listed at most once per `ttl_s`), sorted by task_id."""
        if time.monotonic() - self._listed_at >= self.ttl_s:
            try:
                self._scan_all([])
            except Exception as e:
                logger.warning("prefix store %s: listing failed, serving the last index: %s", self.root, e)
        with self._lock:
            return sorted(self._latest.values(), key=lambda r: r.task_id)

    def known(self, task_id: str) -> bool:
        """Whether the task has, or ever had, anything stored (a version, a tombstone, a half upload)."""
        return self.objects.any(validate_task_id(task_id))

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        """Commit a new version whose file is `encode(version)`; older versions' objects are then removed."""
        validate_task_id(task_id)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        with self._task_lock(task_id):
            kinds, deleted = _parse(self.objects.list_task(task_id))
            version = max(deleted, *kinds, self._max_version.get(task_id, 0)) + 1
            for _ in range(_ATTEMPTS):
                data = encode(version)  # may raise: nothing of this version is written yet
                sha256 = hashlib.sha256(data).hexdigest()
                record = PrefixRecord(
                    task_id,
                    version,
                    sha256,
                    num_virtual_tokens,
                    len(data),
                    time.time(),
                    source,
                    frame_of(data),
                )
                meta = json.dumps(record.to_dict(), indent=1).encode()
                if self.objects.create(task_id, f"v{version}.safetensors", data) and self.objects.create(
                    task_id, f"v{version}.json", meta
                ):
                    kinds, deleted = _parse(self.objects.list_task(task_id))
                    if deleted < version and not any(v > version and "json" in k for v, k in kinds.items()):
                        break  # committed, and nothing got ahead of it
                    self._remove(task_id, [version])  # overtaken before it was ever the latest: withdrawn
                version = max(version, deleted, *kinds) + 1  # a 412: another writer has this version
            else:
                raise PrefixServerError(f"no version of {task_id!r} committed in {_ATTEMPTS} tries")
            # after the marker, readers look again: then the older versions can go
            self._publish(task_id, record, version, 0, [v for v in kinds if v < version], version=version)
        return record

    def delete(self, task_id: str) -> PrefixRecord:
        """Remove a task's objects; its tombstone keeps the deleted versions from ever being issued again."""
        validate_task_id(task_id)
        with self._task_lock(task_id):
            listing = self.objects.list_task(task_id)
            self._refresh(task_id, listing, [])
            with self._lock:
                record = self._latest.get(task_id)
            if record is None:
                raise PrefixNotFound(f"task {task_id!r} not found")
            kinds, deleted = _parse(listing)
            through = max(deleted, *kinds, self._max_version.get(task_id, 0))
            tombstone = {"task_id": task_id, "deleted_through": through, "deleted_at": time.time()}
            # Before any object goes, so a crash mid-delete cannot resurrect the task.
            self.objects.put(task_id, f"deleted-{through}.json", json.dumps(tombstone).encode())
            old = [f"deleted-{n}.json" for n in _tombstones(listing) if n < through]
            self._publish(task_id, None, through, through, kinds, old, deleted_through=through)
        return record

    def read(self, record: PrefixRecord) -> bytes:
        """The file of `record`, checked against its sha256; FileNotFoundError once superseded or deleted."""
        validate_task_id(record.task_id)
        try:
            data = self.objects.get(record.task_id, f"v{record.version}.safetensors")
        except FileNotFoundError:
            with self._lock:  # the index is behind: the next lookup lists the task, whatever the marker
                self._seen[record.task_id] = (_STALE, -math.inf)
            raise
        return verified(record, data)

    def recover(self) -> list[str]:
        """Build the index from the bucket, removing only what no reader or writer can need (versions
        below a task's newest whole one, deleted ones, older tombstones). Returns the warnings logged."""
        warnings: list[str] = []
        self._scan_all(warnings, cleanup=True)
        for line in warnings:
            logger.warning("prefix store: %s", line)
        return warnings

    def _sync(self, task_id: str) -> None:
        """Re-read the task if its marker changed, at most once per `ttl_s`."""
        now = time.monotonic()
        with self._lock:
            etag, checked = self._seen.get(task_id, (None, self._absent.get(task_id, -math.inf)))
            seen = task_id in self._seen
        if now - checked < self.ttl_s:
            return
        try:
            new_etag = self.objects.etag(task_id, _MARKER)
        except StoreUnavailable:
            if not seen:  # nothing known of it, and "not found" would be a guess: 503
                raise
            new_etag = etag  # serve what is known (s3_bucket.py logged the outage); check after ttl_s
        except Exception as e:
            logger.warning("prefix store %s: cannot check %r: %s", self.root, task_id, e)
            new_etag = etag
        if seen and new_etag == etag:
            with self._lock:
                self._seen[task_id] = (etag, now)
        elif not seen and new_etag is None:  # never stored (or only half: recover and list see that)
            with self._lock:
                if len(self._absent) >= _MAX_ABSENT:
                    self._absent.clear()
                self._absent[task_id] = now
        else:  # the marker from before the listing: a change during it makes the next check list again
            try:
                self._refresh(task_id, self.objects.list_task(task_id), [], etag=new_etag, when=now)
            except StoreUnavailable:
                if not seen:
                    raise  # else serve what is known; the next lookup lists again

    def _scan_all(self, warnings: list[str], cleanup: bool = False) -> None:
        now = time.monotonic()
        tasks = self.objects.list_tasks(warnings)
        for task_id, listing in sorted(tasks.items()):
            etag = listing.get(_MARKER, (None, 0))[0]
            kinds, _ = _parse(listing)
            with self._lock:
                seen = self._seen.get(task_id)
                # a commit this index never saw: its writer died before rewriting latest.json
                unseen = max(kinds, default=0) > self._max_version.get(task_id, 0)
            if cleanup or seen is None or seen[0] != etag or unseen:
                self._refresh(task_id, listing, warnings, etag=etag, when=now, cleanup=cleanup)
        with self._lock:  # tasks whose every object is gone, unless indexed since the listing began
            gone = [t for t in self._latest if t not in tasks and self._seen.get(t, (0, now))[1] < now]
        for task_id in gone:
            self._index(task_id, None, 0, math.inf, None, when=now)
        self._listed_at = now

    def _refresh(
        self, task_id: str, listing: Listing, warnings: list[str], *, etag=_STALE, when=None, cleanup=False
    ) -> None:
        """Index the newest whole version in `listing`; `cleanup` removes what can never be served."""
        etag = listing.get(_MARKER, (None, 0))[0] if etag == _STALE else etag
        kinds, deleted = _parse(listing)
        found: list[str] = []
        record = None
        for version in sorted((v for v in kinds if v > deleted), reverse=True):
            record, problem = self._check(task_id, version, kinds[version])
            if record is not None:
                break
            if problem and ("json" in kinds[version] or cleanup):  # an uncommitted one may be a live upload
                found.append(f"skipped {self.objects.where(task_id)}v{version}.*: {problem}")
        self._index(task_id, record, max(deleted, *kinds, 0), deleted, etag, when=when)
        if cleanup:  # newer broken versions stay, for inspection
            keep_above = record.version if record is not None else deleted
            old = [f"deleted-{n}.json" for n in _tombstones(listing) if n < deleted]
            self._remove(task_id, [v for v in kinds if v < keep_above or v <= deleted], old)
        warnings += found
        for line in () if cleanup else found:
            logger.warning("prefix store: %s", line)

    def _check(self, task_id: str, version: int, kinds: set[str]) -> tuple[PrefixRecord | None, str]:
        if "json" not in kinds:
            return None, f"no v{version}.json (upload not committed)"
        if "safetensors" not in kinds:
            return None, f"v{version}.json has no v{version}.safetensors"
        try:
            meta = self.objects.get(task_id, f"v{version}.json")
            data = self.objects.get(task_id, f"v{version}.safetensors")
        except FileNotFoundError:
            return None, ""  # removed while being read: superseded or deleted meanwhile, nothing wrong
        return check_version_bytes(task_id, version, meta, data)

    def _index(self, task_id, record, max_version, deleted, etag, *, when=None, notify=True) -> None:
        """Take what a listing (or a write) says of a task into the index; never moves back a version."""
        with self._lock:
            before = current = self._latest.get(task_id)
            if record is not None and (current is None or record.version > current.version):
                self._latest[task_id] = record
            elif current is not None and deleted >= current.version:
                del self._latest[task_id]
            self._max_version[task_id] = max(self._max_version.get(task_id, 0), max_version)
            self._seen[task_id] = (etag, time.monotonic() if when is None else when)
            self._absent.pop(task_id, None)
            changed = self._latest.get(task_id) != before
        if changed and notify and self.on_change is not None:
            self.on_change(task_id)

    def _publish(self, task_id, record, max_version, deleted, versions, names=(), **marker: int) -> None:
        """After a commit (a version's .json, or a tombstone): rewrite latest.json, index the commit,
        remove what it superseded. The commit stands whatever fails here, so that is logged, not raised:
        other servers then find it by listing, and a later write or recovery removes the leftovers."""
        try:
            etag = self._touch(task_id, **marker)
        except Exception as e:
            logger.warning(
                "prefix store %s: %r committed, latest.json not rewritten: %s", self.root, task_id, e
            )
            etag = _STALE
        self._index(task_id, record, max_version, deleted, etag, notify=False)
        try:
            self._remove(task_id, versions, names)
        except Exception as e:
            logger.warning("prefix store %s: %r committed, old objects left: %s", self.root, task_id, e)

    def _touch(self, task_id: str, **info: int) -> str:
        body = {"task_id": task_id, **info, "at": time.time(), "writer": self._writer}
        return self.objects.put(task_id, _MARKER, json.dumps(body).encode())

    def _remove(self, task_id: str, versions, names=()) -> None:
        """Remove versions' objects, every .json (commit marker) before any .safetensors, then `names`."""
        versions = sorted(versions)
        self.objects.remove(
            task_id, [f"v{v}.json" for v in versions] + [f"v{v}.safetensors" for v in versions] + list(names)
        )

    def _task_lock(self, task_id: str) -> threading.Lock:
        with self._lock:
            return self._task_locks.setdefault(task_id, threading.Lock())


def _parse(listing: Listing) -> tuple[dict[int, set[str]], int]:
    """({version: which of "json", "safetensors" exist}, highest deleted version) of a task's listing."""
    kinds: dict[int, set[str]] = {}
    for name in listing:
        if m := _VERSION_RE.fullmatch(name):
            kinds.setdefault(int(m[1]), set()).add(m[2])
    return kinds, max(_tombstones(listing), default=0)


def _tombstones(listing: Listing) -> list[int]:
    return [int(m[1]) for name in listing if (m := _TOMBSTONE_RE.fullmatch(name))]
