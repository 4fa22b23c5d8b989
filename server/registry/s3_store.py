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

import json
import logging
import math
import time
import uuid
from collections.abc import Callable

from server.errors import PrefixServerError, StoreUnavailable
from server.registry import versions
from server.registry.index import TaskIndex
from server.registry.s3_bucket import Listing, TaskObjects
from server.registry.store import (
    PrefixRecord,
    check_source,
    check_version_bytes,
    metadata_bytes,
    record_for,
    validate_task_id,
    verified,
)

logger = logging.getLogger(__name__)

_MARKER = "latest.json"
_ATTEMPTS = 100  # versions one put tries before it gives up (only under heavy contention on one task)
_STALE = "(stale)"  # an ETag no real one equals: the next lookup lists the task
_MAX_ABSENT = 10_000  # unknown ids remembered (for `ttl_s`), so a flood of them costs one HEAD per TTL


class S3PrefixStore:
    """PrefixStore over a bucket; thread-safe. `on_change(task_id)` runs when a check finds
    a task changed by another server (the registry then drops the superseded tensors)."""

    def __init__(
        self, objects: TaskObjects, *, ttl_s: float = 1.0, on_change: Callable[[str], object] | None = None
    ) -> None:
        self.objects, self.root = objects, objects.url
        self.ttl_s, self.on_change = ttl_s, on_change
        self._writer = uuid.uuid4().hex  # in latest.json, so that every write changes its ETag
        self.index = TaskIndex()
        self._lock = self.index.lock  # also guards the dicts below; never held during a request to the store
        self._seen: dict[str, tuple[str | None, float]] = {}  # task -> (latest.json ETag, when checked)
        self._absent: dict[str, float] = {}  # ids with no object -> when checked
        self._listed_at = -math.inf

    @classmethod
    def from_url(cls, url: str, *, ttl_s: float = 1.0) -> S3PrefixStore:
        """A store over s3://bucket[/key/prefix]; PrefixServerError naming the URL if the bucket fails."""
        return cls(TaskObjects.connect(url), ttl_s=ttl_s)

    def get(self, task_id: str) -> PrefixRecord:
        """The latest committed version, as of a check at most `ttl_s` old; PrefixNotFound if none."""
        self._sync(validate_task_id(task_id))
        return self.index.get(task_id)

    def list(self) -> list[PrefixRecord]:
        """Latest version of every task (the bucket listed at most once per `ttl_s`), sorted by task_id."""
        if time.monotonic() - self._listed_at >= self.ttl_s:
            try:
                self._scan_all([])
            except Exception as e:
                logger.warning("prefix store %s: listing failed, serving the last index: %s", self.root, e)
        return self.index.list()

    def known(self, task_id: str) -> bool:
        """Whether the task has, or ever had, anything stored (a version, a tombstone, a half upload)."""
        return self.objects.any(validate_task_id(task_id))

    def put(
        self, task_id: str, encode: Callable[[int], bytes], *, num_virtual_tokens: int, source: str
    ) -> PrefixRecord:
        """Commit a new version whose file is `encode(version)`; older versions' objects are then removed."""
        validate_task_id(task_id)
        check_source(source)
        with self.index.task_lock(task_id):
            kinds, deleted = _parse(self.objects.list_task(task_id))
            version = max(versions.highest_issued(kinds, deleted), self.index.max_version(task_id)) + 1
            for _ in range(_ATTEMPTS):
                data = encode(version)  # may raise: nothing of this version is written yet
                record = record_for(task_id, version, data, num_virtual_tokens, source)
                if self.objects.create(task_id, f"v{version}.safetensors", data) and self.objects.create(
                    task_id, f"v{version}.json", metadata_bytes(record)
                ):
                    kinds, deleted = _parse(self.objects.list_task(task_id))
                    if not versions.overtaken(kinds, deleted, version):
                        break  # committed, and nothing got ahead of it
                    self._remove(task_id, [version])  # overtaken before it was ever the latest: withdrawn
                version = max(version, versions.highest_issued(kinds, deleted)) + 1  # a 412: taken
            else:
                raise PrefixServerError(f"no version of {task_id!r} committed in {_ATTEMPTS} tries")
            # after the marker, readers look again: then the older versions can go
            self._publish(task_id, record, version, 0, [v for v in kinds if v < version], version=version)
        return record

    def delete(self, task_id: str) -> PrefixRecord:
        """Remove a task's objects; its tombstone keeps the deleted versions from ever being issued again."""
        validate_task_id(task_id)
        with self.index.task_lock(task_id):
            listing = self.objects.list_task(task_id)
            self._refresh(task_id, listing, [])
            record = self.index.get(task_id)
            kinds, deleted = _parse(listing)
            through = max(versions.highest_issued(kinds, deleted), self.index.max_version(task_id))
            tombstone = {"task_id": task_id, "deleted_through": through, "deleted_at": time.time()}
            # Before any object goes, so a crash mid-delete cannot resurrect the task.
            self.objects.put(task_id, f"deleted-{through}.json", json.dumps(tombstone).encode())
            old = [f"deleted-{n}.json" for n in versions.tombstones(listing) if n < through]
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
        below a task's newest whole one, deleted ones, older tombstones). Returns the warnings (the opener
        logs them)."""
        warnings: list[str] = []
        self._scan_all(warnings, cleanup=True)
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
                unseen = max(kinds, default=0) > self.index.max_version(task_id)
            if cleanup or seen is None or seen[0] != etag or unseen:
                self._refresh(task_id, listing, warnings, etag=etag, when=now, cleanup=cleanup)
        with self._lock:  # tasks whose every object is gone, unless indexed since the listing began
            gone = [
                t for t in self.index.task_ids() if t not in tasks and self._seen.get(t, (0, now))[1] < now
            ]
        for task_id in gone:
            self._index(task_id, None, 0, math.inf, None, when=now)
        self._listed_at = now

    def _refresh(
        self, task_id: str, listing: Listing, warnings: list[str], *, etag=_STALE, when=None, cleanup=False
    ) -> None:
        """Index the newest whole version in `listing`; `cleanup` removes what can never be served."""
        etag = listing.get(_MARKER, (None, 0))[0] if etag == _STALE else etag
        kinds, deleted = _parse(listing)
        record, skipped = versions.newest_whole(kinds, deleted, lambda v: self._read_version(task_id, v))
        found = [
            f"skipped {self.objects.where(task_id)}v{version}.*: {problem}"
            for version, problem in skipped  # an uncommitted one may be a live upload: unremarked
            if problem and ("json" in kinds[version] or cleanup)
        ]
        self._index(task_id, record, versions.highest_issued(kinds, deleted), deleted, etag, when=when)
        if cleanup:  # newer broken versions stay, for inspection
            served = None if record is None else record.version
            old = [f"deleted-{n}.json" for n in versions.tombstones(listing) if n < deleted]
            self._remove(task_id, versions.removable(kinds, served, deleted), old)
        warnings += found
        for line in () if cleanup else found:
            logger.warning("prefix store: %s", line)

    def _read_version(self, task_id: str, version: int) -> tuple[PrefixRecord | None, str]:
        """(record, "") if a committed version's objects are whole and agree, else (None, what is wrong)."""
        try:
            meta = self.objects.get(task_id, f"v{version}.json")
            data = self.objects.get(task_id, f"v{version}.safetensors")
        except FileNotFoundError:
            return None, ""  # removed while being read: superseded or deleted meanwhile, nothing wrong
        return check_version_bytes(task_id, version, meta, data)

    def _index(self, task_id, record, max_version, deleted, etag, *, when=None, notify=True) -> None:
        """Take what a listing (or a write) says of a task into the index; never moves back a version."""
        with self._lock:  # the index and what this store saw of the task change together
            changed = self.index.take(task_id, record, max_version, deleted)
            self._seen[task_id] = (etag, time.monotonic() if when is None else when)
            self._absent.pop(task_id, None)
        if changed and notify and self.on_change is not None:
            self.on_change(task_id)

    def _publish(self, task_id, record, max_version, deleted, old, names=(), **marker: int) -> None:
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
            self._remove(task_id, old, names)
        except Exception as e:
            logger.warning("prefix store %s: %r committed, old objects left: %s", self.root, task_id, e)

    def _touch(self, task_id: str, **info: int) -> str:
        body = {"task_id": task_id, **info, "at": time.time(), "writer": self._writer}
        return self.objects.put(task_id, _MARKER, json.dumps(body).encode())

    def _remove(self, task_id: str, old, names=()) -> None:
        """Remove versions' objects, every .json (commit marker) before any .safetensors, then `names`."""
        old = sorted(old)
        self.objects.remove(
            task_id, [f"v{v}.json" for v in old] + [f"v{v}.safetensors" for v in old] + list(names)
        )


def _parse(listing: Listing) -> tuple[versions.Kinds, int]:
    """({version: which of "json", "safetensors" exist}, highest deleted version) of a task's listing."""
    return versions.version_files(listing), max(versions.tombstones(listing), default=0)
