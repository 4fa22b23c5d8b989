"""The K/V page pool: keys and values of every layer in fixed-size pages, allocated once.

A page holds `page_size` consecutive tokens of one sequence for every layer and K/V head. Each running row
has a block table: its task prefix's pages (shared with every row of that prefix version, read only),
then its own pages (prompt, then generated tokens). Page 0 is scratch: never handed out; rows that only
pad a compiled batch write there, and block tables are padded with it.

Prefixes are materialised once per version (`ResidentPrefixes`): the first row of a task version writes
its K/V into pages, later rows reference them; a refcount keeps them while rows use them, idle ones stay
resident (least recently used first out) until their pages are needed, and a superseded version (hot
swap) goes as soon as no row uses it.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from server.registry.format import ModelFingerprint, PrefixKV

SCRATCH_PAGE = 0
PAGE_SIZE = 16  # tokens per page (vLLM's default block size)


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def bytes_per_page(fp: ModelFingerprint, page_size: int, dtype: torch.dtype) -> int:
    """K and V of one page across every layer."""
    return 2 * fp.num_layers * fp.kv_heads * page_size * fp.head_dim * dtype.itemsize


@dataclass(frozen=True)
class _Identity:
    object_id: int


def _versioned(key: Hashable) -> bool:
    """A registry key (task_id, version, sha256)."""
    return isinstance(key, tuple) and len(key) == 3 and isinstance(key[1], int)


# On a GPU the pool takes this share of the memory free once the model is loaded (vLLM's
# gpu_memory_utilization idea), less GPU_RESERVE_BYTES for activations, CUDA graphs and logits.
GPU_POOL_SHARE = 0.6
GPU_RESERVE_BYTES = 2 << 30


def default_pool_bytes(
    fp: ModelFingerprint, dtype: torch.dtype, device, tokens: int, other_bytes: int = 0
) -> int:
    """The pool's size when none is set, at least 2 pages.

    CPU: `tokens` tokens (the caller's worst case of running rows and their prefixes) and the scratch
    page, at most a quarter of MemAvailable (memory is shared with everything else on the machine).
    CUDA: the GPU is the server's: `GPU_POOL_SHARE` of its free memory less `GPU_RESERVE_BYTES` and
    `other_bytes` (the prefix cache, which lives on the GPU too), and never less than the tokens want if
    that fits; pages beyond what running rows need keep more idle task prefixes resident."""
    page = bytes_per_page(fp, PAGE_SIZE, dtype)
    wanted = (pages_for(tokens, PAGE_SIZE) + 1) * page
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        room = max(0, free - GPU_RESERVE_BYTES - other_bytes)
        return max(2 * page, min(max(wanted, int(free * GPU_POOL_SHARE) - other_bytes), room))
    free = _mem_available()
    return max(2 * page, min(wanted, free // 4) if free else wanted)


def _mem_available() -> int:
    """Linux's estimate of memory available without swapping, in bytes; 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class OutOfPages(RuntimeError):
    """The pool cannot hand out that many pages now (the scheduler's plan should have prevented it)."""


class PagePool:
    """keys, values: [layers, num_pages, kv_heads, page_size, head_dim]; a free list of page ids."""

    def __init__(self, fp: ModelFingerprint, num_pages: int, page_size: int, dtype, device):
        if num_pages < 2:
            raise ValueError(f"the K/V pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.fp, self.num_pages, self.page_size = fp, num_pages, page_size
        shape = (fp.num_layers, num_pages, fp.kv_heads, page_size, fp.head_dim)
        # Zeros, not empty: a masked column is still multiplied by 0 in torch's attention, and 0 * NaN is NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # popped from the end: low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{n} K/V pages asked for, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    @torch.inference_mode()
    def write(self, pages: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill `pages` in order with a sequence's K/V. keys, values: [layers, kv_heads, length, head_dim]."""
        length = keys.shape[2]
        for i, page in enumerate(pages):
            start = i * self.page_size
            end = min(start + self.page_size, length)
            self.keys[:, page, :, : end - start] = keys[:, :, start:end]
            self.values[:, page, :, : end - start] = values[:, :, start:end]


@dataclass(eq=False)
class PrefixPages:
    """One prefix version resident in the pool."""

    key: Hashable
    pages: list[int]
    length: int  # tokens: the prefix's num_virtual_tokens
    refs: int = 0  # running rows that read it
    superseded: bool = False  # a newer version of its task is resident: freed with its last row
    prefix: PrefixKV | None = field(default=None, repr=False)  # kept when keyed by identity (no registry key)


class ResidentPrefixes:
    """Prefix versions materialised in the pool: acquire / release by refcount, idle ones in LRU order."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.entries: dict[Hashable, PrefixPages] = {}
        self._idle: collections.OrderedDict[Hashable, PrefixPages] = collections.OrderedDict()  # LRU first

    @staticmethod
    def key_of(prefix: PrefixKV, key: Hashable | None) -> Hashable:
        """The registry's (task_id, version, sha256), or the PrefixKV object itself (kept alive by its entry,
        so its id is not reused while the entry exists)."""
        return key if key is not None else _Identity(id(prefix))

    # list(...) first: /metrics reads these from another thread while the engine thread changes them.
    @property
    def idle_pages(self) -> int:
        return sum(len(e.pages) for e in list(self._idle.values()))

    @property
    def resident_pages(self) -> int:
        return sum(len(e.pages) for e in list(self.entries.values()))

    @property
    def shared_pages(self) -> int:
        """Pages read by more than one running row."""
        return sum(len(e.pages) for e in list(self.entries.values()) if e.refs > 1)

    def is_resident(self, key: Hashable) -> bool:
        return key in self.entries

    def pages_to_acquire(self, key: Hashable, length: int) -> int:
        """Pages that acquiring this prefix takes out of (free + idle) pages: 0 if rows already use it."""
        entry = self.entries.get(key)
        if entry is not None and entry.refs > 0:
            return 0
        return pages_for(length, self.pool.page_size)

    def acquire(self, prefix: PrefixKV, key: Hashable | None) -> PrefixPages:
        """Pin a prefix's pages, writing them first if it is not resident (evicting idle prefixes for room)."""
        key = self.key_of(prefix, key)
        entry = self.entries.get(key)
        if entry is None:
            needed = pages_for(prefix.num_virtual_tokens, self.pool.page_size)
            self.make_room(needed)
            pages = self.pool.allocate(needed)
            self.pool.write(pages, prefix.keys, prefix.values)
            keep = prefix if isinstance(key, _Identity) else None
            entry = PrefixPages(key, pages, prefix.num_virtual_tokens, prefix=keep)
            self._supersede(key)
            self.entries[key] = entry
        self._idle.pop(key, None)
        entry.refs += 1
        return entry

    def release(self, entry: PrefixPages) -> None:
        entry.refs -= 1
        assert entry.refs >= 0, f"prefix {entry.key!r} released more often than acquired"
        if entry.refs == 0:
            if entry.superseded:
                self._drop(entry)
            else:
                self._idle[entry.key] = entry

    def make_room(self, needed: int) -> None:
        """Evict idle prefixes, least recently used first, until `needed` pages are free (if they can be)."""
        while self.pool.num_free < needed and self._idle:
            _, entry = self._idle.popitem(last=False)
            self._drop(entry)

    def _supersede(self, key: Hashable) -> None:
        """A newer version of a registry task arrived: older versions go now if idle, else with their last row."""
        if not _versioned(key):
            return
        task_id, version = key[0], key[1]
        for other in list(self.entries.values()):
            k = other.key
            if _versioned(k) and k[0] == task_id and k[1] < version:
                other.superseded = True
                if other.refs == 0:
                    self._idle.pop(k, None)
                    self._drop(other)

    def _drop(self, entry: PrefixPages) -> None:
        del self.entries[entry.key]
        self.pool.free(entry.pages)
