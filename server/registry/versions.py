"""The version log every store backend keeps: pure functions over a task's listing of file names.

A task's versions are files v<N>.safetensors then v<N>.json (the commit marker, written last); a version
exists only with both files. Tombstones say "versions up to N are deleted": the folder backends keep one
deleted.json (its N inside it), the object store one deleted-<N>.json per delete. Versions only grow: no
number is issued twice, and an index never moves a task back to an older version.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from server.registry.store import PrefixRecord

VERSION_FILE_RE = re.compile(r"v([1-9][0-9]*)\.(safetensors|json)")
TOMBSTONE = "deleted.json"  # folder backends: one tombstone, rewritten by each delete
TOMBSTONE_RE = re.compile(r"deleted-([0-9]+)\.json")  # object store: one per delete, never overwritten

Kinds = dict[int, set[str]]  # version -> which of "json", "safetensors" are present


def version_files(names: Iterable[str]) -> Kinds:
    """{version: {"json", "safetensors"} or part of it} of the version files among `names`."""
    kinds: Kinds = {}
    for name in names:
        if m := VERSION_FILE_RE.fullmatch(name):
            kinds.setdefault(int(m[1]), set()).add(m[2])
    return kinds


def tombstones(names: Iterable[str]) -> list[int]:
    """The N of every deleted-<N>.json among `names` (object store tombstones)."""
    return [int(m[1]) for name in names if (m := TOMBSTONE_RE.fullmatch(name))]


def file_names(version: int) -> list[str]:
    """A version's files in removal order: the commit marker first, so a half-removed one is uncommitted."""
    return [f"v{version}.json", f"v{version}.safetensors"]


def commit_problem(version: int, kinds: set[str]) -> str:
    """ "" if both of a version's files are present (it was committed), else what is missing."""
    if "json" not in kinds:
        return f"no v{version}.json (upload never committed)"
    if "safetensors" not in kinds:
        return f"v{version}.json has no v{version}.safetensors"
    return ""


def candidates(kinds: Kinds, deleted_through: int) -> list[int]:
    """Versions a reader may serve, newest first: those above the tombstone."""
    return sorted((v for v in kinds if v > deleted_through), reverse=True)


def highest_issued(kinds: Kinds, deleted_through: int) -> int:
    """The highest version ever issued that the listing shows (deleted ones included); 0 if none."""
    return max(deleted_through, *kinds, 0)


def removable(kinds: Kinds, served: int | None, deleted_through: int) -> list[int]:
    """Versions no reader can ever need: below the served one, or deleted. Newer broken ones stay, for
    inspection (and because an uncommitted newer one may be a live upload)."""
    keep_above = served if served is not None else deleted_through
    return sorted(v for v in kinds if v < keep_above or v <= deleted_through)


def overtaken(kinds: Kinds, deleted_through: int, version: int) -> bool:
    """Whether a version just committed was got ahead of before it was ever the latest: a tombstone covers
    it, or a newer committed version exists (a slow writer whose number a cleanup freed)."""
    return deleted_through >= version or any(v > version and "json" in k for v, k in kinds.items())


def newest_whole(
    kinds: Kinds, deleted_through: int, read: Callable[[int], tuple[PrefixRecord | None, str]]
) -> tuple[PrefixRecord | None, list[tuple[int, str]]]:
    """(the newest committed version that `read(version)` finds whole, or None; [(version, problem)] of
    the newer ones skipped). `read` returns (record, "") or (None, what is wrong)."""
    skipped: list[tuple[int, str]] = []
    for version in candidates(kinds, deleted_through):
        problem = commit_problem(version, kinds[version])
        if not problem:
            record, problem = read(version)
            if record is not None:
                return record, skipped
        skipped.append((version, problem))
    return None, skipped


def advance(
    current: PrefixRecord | None, found: PrefixRecord | None, deleted_through: int
) -> PrefixRecord | None:
    """The index's entry for a task after a read of it: only forward. An older `found` means the read
    raced a newer commit, so the current entry stays; a tombstone covering the current entry removes it."""
    if found is not None and (current is None or found.version > current.version):
        return found
    if current is not None and deleted_through >= current.version:
        return None
    return current
