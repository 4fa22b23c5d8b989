"""Prefix cache: byte budget, LRU order, pins that are never evicted, paired release, counters."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import pytest

from server.errors import Overloaded
from server.registry.cache import PrefixCache


@dataclass(frozen=True)
class Blob:
    """A stand-in value: the cache only looks at `.nbytes`."""

    name: str
    nbytes: int = 100


def key(name: str, version: int = 1) -> tuple[str, int]:
    return (name, version)


class Loader:
    """Counts calls, so a test can tell a hit from a miss."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str, nbytes: int = 100):
        def load() -> Blob:
            self.calls.append(name)
            return Blob(name, nbytes)

        return load


def use(cache: PrefixCache, load: Loader, name: str, nbytes: int = 100) -> Blob:
    """Acquire and release at once: touches LRU order without holding a pin."""
    value = cache.acquire(key(name), load(name, nbytes))
    cache.release(key(name))
    return value


def test_hits_misses_and_lru_eviction():
    cache, load = PrefixCache(300), Loader()
    for name in "abc":
        use(cache, load, name)
    use(cache, load, "a")  # a is now the most recently used; b the least
    assert load.calls == ["a", "b", "c"]
    use(cache, load, "d")
    assert key("b") not in cache
    assert all(key(n) in cache for n in "acd")
    use(cache, load, "e")  # then c goes
    assert key("c") not in cache
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 5, 2)
    assert stats["bytes_in_use"] == 300 and stats["pinned_bytes"] == 0


def test_one_big_value_evicts_several():
    cache, load = PrefixCache(400), Loader()
    for name in "abc":
        use(cache, load, name)
    use(cache, load, "big", nbytes=250)  # needs 150 of the 300 bytes in use freed: a and b go, c stays
    assert [key(n) in cache for n in "abc"] == [False, False, True]
    assert cache.stats()["bytes_in_use"] == 350


def test_pinned_entries_are_never_evicted():
    cache, load = PrefixCache(200), Loader()
    a = cache.acquire(key("a"), load("a"))
    b = cache.acquire(key("b"), load("b"))
    assert cache.acquire(key("a"), load("a")) is a  # already cached: a second pin needs no room
    cache.release(key("a"))
    with pytest.raises(Overloaded) as info:
        cache.acquire(key("c"), load("c"))
    message = str(info.value)
    assert "budget is 200 bytes" in message and "200 bytes are pinned" in message and "100 bytes" in message
    assert key("c") not in cache  # the loaded value was not kept
    assert cache.acquire(key("a"), load("a")) is a  # nothing lost: a hit, same object
    cache.release(key("a"))
    assert cache.stats()["evictions"] == 0

    cache.release(key("a"))
    c = cache.acquire(key("c"), load("c"))
    assert c == Blob("c") and key("a") not in cache and key("b") in cache
    assert cache.pins(key("b")) == 1 and cache.pins(key("c")) == 1
    for name in "bc":
        cache.release(key(name))
    assert b == Blob("b")
    stats = cache.stats()
    assert (stats["evictions"], stats["pinned_bytes"], stats["num_pinned"]) == (1, 0, 0)


def test_refcounts_need_one_release_per_acquire():
    cache, load = PrefixCache(100), Loader()
    cache.acquire(key("a"), load("a"))
    cache.acquire(key("a"), load("a"))
    cache.release(key("a"))
    with pytest.raises(Overloaded):  # still pinned once
        cache.acquire(key("b"), load("b"))
    cache.release(key("a"))
    use(cache, load, "b")
    assert key("a") not in cache


def test_release_of_unpinned_key_raises():
    cache, load = PrefixCache(100), Loader()
    with pytest.raises(RuntimeError, match="not pinned"):
        cache.release(key("never"))
    use(cache, load, "a")
    with pytest.raises(RuntimeError, match="'a' v1, which is not pinned"):
        cache.release(key("a"))


def test_value_larger_than_budget_is_overloaded_even_when_empty():
    cache, load = PrefixCache(100), Loader()
    with pytest.raises(Overloaded, match=r"budget is 100 bytes and 0 bytes are pinned.*needs 101 bytes"):
        cache.acquire(key("big"), load("big", 101))
    assert cache.stats()["bytes_in_use"] == 0


def test_loader_error_propagates_and_keeps_nothing():
    cache = PrefixCache(100)

    def failing() -> Blob:
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        cache.acquire(key("a"), failing)
    assert key("a") not in cache
    assert cache.stats()["misses"] == 1


def test_drop_removes_only_unpinned_entries_of_the_task():
    cache, load = PrefixCache(1000), Loader()
    cache.acquire(key("t", 1), load("t1"))  # pinned by a running request
    cache.acquire(key("t", 2), load("t2"))
    cache.release(key("t", 2))
    use(cache, load, "other")
    assert cache.drop("t") == 1
    assert key("t", 1) in cache and key("t", 2) not in cache and key("other") in cache
    cache.release(key("t", 1))  # still releasable after the drop
    assert cache.drop("t") == 1
    assert cache.stats()["bytes_in_use"] == 100


def test_stats_count_load_time():
    cache = PrefixCache(100)

    def slow() -> Blob:
        time.sleep(0.02)
        return Blob("a")

    cache.acquire(key("a"), slow)
    cache.acquire(key("a"), slow)
    stats = cache.stats()
    assert stats["load_seconds_total"] >= 0.02
    assert (stats["hits"], stats["misses"], stats["num_entries"]) == (1, 1, 1)


def test_threads_keep_the_budget_and_pins_balanced():
    cache, budget = PrefixCache(500), 500
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            k = key(f"t{rng.randrange(12)}")
            try:
                cache.acquire(k, lambda k=k: Blob(k[0], 100))
            except Overloaded:
                continue
            try:
                assert cache.stats()["bytes_in_use"] <= budget
            except AssertionError as e:
                errors.append(e)
            cache.release(k)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert errors == []
    assert stats["pinned_bytes"] == 0 and stats["num_pinned"] == 0
    assert stats["bytes_in_use"] == 100 * stats["num_entries"] <= budget
