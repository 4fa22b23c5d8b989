"""The version log every store backend shares (server/registry/versions.py): pure functions over a
task's listing of file names, so parametrized tables, no store."""

from __future__ import annotations

import pytest

from server.registry import versions
from server.registry.store import PrefixRecord


def record(version: int) -> PrefixRecord:
    return PrefixRecord("t", version, "0" * 64, 4, 100, 0.0, "native")


@pytest.mark.parametrize(
    "names, kinds",
    [
        ([], {}),
        (["v1.json", "v1.safetensors"], {1: {"json", "safetensors"}}),
        (["v2.safetensors", "v3.json", "v10.json"], {2: {"safetensors"}, 3: {"json"}, 10: {"json"}}),
        # not version files: a zero or padded number, temp files, tombstones, the S3 change marker
        (["v0.json", "v01.json", ".v1.json.x.tmp", "deleted.json", "deleted-3.json", "latest.json"], {}),
        (["v1.txt", "V1.json", "v1.json.bak", "v-1.json"], {}),
    ],
)
def test_version_files(names, kinds):
    assert versions.version_files(names) == kinds


@pytest.mark.parametrize(
    "names, numbers",
    [
        ([], []),
        (["deleted-0.json", "deleted-12.json", "v1.json"], [0, 12]),
        (["deleted.json", "deleted-x.json", "deleted-1.json.tmp"], []),
    ],
)
def test_tombstones(names, numbers):
    assert sorted(versions.tombstones(names)) == numbers


@pytest.mark.parametrize(
    "kinds, problem",
    [
        ({"json", "safetensors"}, ""),
        ({"safetensors"}, "no v7.json (upload never committed)"),
        ({"json"}, "v7.json has no v7.safetensors"),
        (set(), "no v7.json (upload never committed)"),
    ],
)
def test_a_version_exists_only_with_both_files(kinds, problem):
    assert versions.commit_problem(7, kinds) == problem


def test_file_names_remove_the_commit_marker_first():
    assert versions.file_names(3) == ["v3.json", "v3.safetensors"]


BOTH = {"json", "safetensors"}


@pytest.mark.parametrize(
    "kinds, deleted_through, candidates, highest",
    [
        ({}, 0, [], 0),
        ({}, 5, [], 5),  # everything deleted: the tombstone alone keeps the numbers
        ({1: BOTH, 2: BOTH, 3: {"safetensors"}}, 0, [3, 2, 1], 3),
        ({1: BOTH, 2: BOTH, 3: BOTH}, 2, [3], 3),
        ({1: BOTH, 2: BOTH}, 4, [], 4),
    ],
)
def test_candidates_and_highest_issued(kinds, deleted_through, candidates, highest):
    assert versions.candidates(kinds, deleted_through) == candidates
    assert versions.highest_issued(kinds, deleted_through) == highest


@pytest.mark.parametrize(
    "kinds, served, deleted_through, removable",
    [
        ({1: BOTH, 2: BOTH, 3: BOTH}, 3, 0, [1, 2]),
        ({1: BOTH, 2: BOTH, 3: {"safetensors"}}, 2, 0, [1]),  # a newer broken one stays, for inspection
        ({1: BOTH, 2: BOTH}, None, 2, [1, 2]),  # deleted
        ({1: BOTH, 2: BOTH, 3: {"json"}}, None, 2, [1, 2]),  # newer than the tombstone: stays
        ({2: BOTH, 4: BOTH}, 4, 3, [2]),
        ({1: {"json"}}, None, 0, []),  # nothing served, nothing deleted: nothing is known to be dead
    ],
)
def test_removable(kinds, served, deleted_through, removable):
    assert versions.removable(kinds, served, deleted_through) == removable


@pytest.mark.parametrize(
    "kinds, deleted_through, version, overtaken",
    [
        ({3: BOTH}, 0, 3, False),
        ({3: BOTH, 4: {"safetensors"}}, 0, 3, False),  # a newer upload, not committed yet
        ({3: BOTH, 4: BOTH}, 0, 3, True),  # a newer commit
        ({3: BOTH, 4: {"json"}}, 0, 3, True),
        ({3: BOTH}, 3, 3, True),  # a delete covers it
        ({2: BOTH, 3: BOTH}, 0, 3, False),  # older ones do not matter
    ],
)
def test_overtaken(kinds, deleted_through, version, overtaken):
    assert versions.overtaken(kinds, deleted_through, version) is overtaken


@pytest.mark.parametrize(
    "kinds, deleted_through, whole, found, skipped",
    [
        ({}, 0, set(), None, []),
        ({1: BOTH, 2: BOTH}, 0, {1, 2}, 2, []),
        ({1: BOTH, 2: BOTH}, 0, {1}, 1, [(2, "broken")]),
        ({1: BOTH, 2: {"safetensors"}}, 0, {1, 2}, 1, [(2, "no v2.json (upload never committed)")]),
        ({1: BOTH, 2: {"json"}}, 0, {1, 2}, 1, [(2, "v2.json has no v2.safetensors")]),
        ({1: BOTH, 2: BOTH}, 2, {1, 2}, None, []),  # deleted: never even read
        ({1: BOTH, 2: BOTH, 3: BOTH}, 1, {1}, None, [(3, "broken"), (2, "broken")]),
    ],
)
def test_newest_whole(kinds, deleted_through, whole, found, skipped):
    reads = []

    def read(version):
        reads.append(version)
        return (record(version), "") if version in whole else (None, "broken")

    got, got_skipped = versions.newest_whole(kinds, deleted_through, read)
    assert (got.version if got else None) == found
    assert got_skipped == skipped
    assert all(v > deleted_through and versions.commit_problem(v, kinds[v]) == "" for v in reads)


@pytest.mark.parametrize(
    "current, found, deleted_through, after",
    [
        (None, None, 0, None),
        (None, 1, 0, 1),
        (1, 2, 0, 2),  # a newer commit
        (2, 1, 0, 2),  # a scan that raced a newer commit: never back
        (2, 2, 0, 2),
        (2, None, 2, None),  # deleted
        (3, None, 2, 3),  # a tombstone older than the entry: a later re-upload stays
        (2, None, 0, 2),  # a read that found nothing whole (a half-written listing) removes nothing
        (2, 3, 2, 3),  # deleted and uploaded again
        (2, None, float("inf"), None),  # the object store's "every object of the task is gone"
    ],
)
def test_the_index_only_moves_forward(current, found, deleted_through, after):
    got = versions.advance(
        None if current is None else record(current),
        None if found is None else record(found),
        deleted_through,
    )
    assert (got.version if got else None) == after
