"""Per-tenant quotas: requests per second (a token bucket), concurrent requests, stored prefixes and
their bytes. Defaults from the `--tenant-*` flags; a key's tenant may set its own in the keys file."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.config import Settings
from server.errors import QuotaExceeded

if TYPE_CHECKING:
    from server.api.auth import Caller, KeyRing


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; 0 means unlimited."""

    max_prefixes: int = 0
    max_prefix_bytes: int = 0
    max_concurrent: int = 0
    rate: float = 0.0  # requests per second (token bucket refill)
    burst: int = 0  # bucket size; 0 = max(1, rate)

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        """The defaults every key gets (`--tenant-*`); a key may set its own in the keys file."""
        return cls(
            max_prefixes=settings.tenant_max_prefixes,
            max_prefix_bytes=settings.tenant_max_prefix_bytes,
            max_concurrent=settings.tenant_max_concurrent,
            rate=settings.tenant_rate,
            burst=settings.tenant_burst,
        )


class TenantLimits:
    """Concurrent-request counters and token buckets per tenant (thread-safe)."""

    def __init__(self, ring: KeyRing):
        self.ring = ring
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill time)
        self._prefix_locks: dict[str | None, threading.Lock] = {}

    def prefix_lock(self, caller: Caller) -> threading.Lock:
        """Serializes one tenant's quota check + upload, so two uploads cannot both pass the check."""
        with self._lock:
            return self._prefix_locks.setdefault(caller.tenant, threading.Lock())

    def quotas(self, caller: Caller) -> Quotas | None:
        return self.ring.quotas.get(caller.tenant) if caller.tenant else None

    def begin_request(self, caller: Caller) -> None:
        """Count a request against the rate and concurrency quotas (QuotaExceeded -> 429)."""
        q = self.quotas(caller)
        if q is None:
            return
        with self._lock:
            if q.rate > 0:
                burst = q.burst or max(1.0, q.rate)
                tokens, last = self._buckets.get(caller.tenant, (burst, time.monotonic()))
                now = time.monotonic()
                tokens = min(burst, tokens + (now - last) * q.rate)
                if tokens < 1:
                    raise QuotaExceeded(
                        f"quota: request rate of tenant {caller.tenant!r} is {q.rate:g}/s (burst {burst:g})"
                    )
                self._buckets[caller.tenant] = (tokens - 1, now)
            running = self._in_flight.get(caller.tenant, 0)
            if q.max_concurrent and running >= q.max_concurrent:
                raise QuotaExceeded(
                    f"quota: tenant {caller.tenant!r} already has {running} concurrent requests (max {q.max_concurrent})"
                )
            self._in_flight[caller.tenant] = running + 1

    def end_request(self, caller: Caller) -> None:
        if self.quotas(caller) is None:
            return
        with self._lock:
            self._in_flight[caller.tenant] -= 1

    def check_prefix_quota(self, caller: Caller, records: list, stored_id: str, new_bytes: int) -> None:
        """Before storing a prefix: the tenant's prefix count and bytes, the replaced version not counted."""
        q = self.quotas(caller)
        if q is None:
            return
        others = [r for r in records if caller.owns(r.task_id) and r.task_id != stored_id]
        if q.max_prefixes and len(others) + 1 > q.max_prefixes:
            raise QuotaExceeded(f"quota: tenant {caller.tenant!r} may keep {q.max_prefixes} prefixes")
        used = sum(r.bytes for r in others)
        if q.max_prefix_bytes and used + new_bytes > q.max_prefix_bytes:
            raise QuotaExceeded(
                f"quota: tenant {caller.tenant!r} prefix bytes would be {used + new_bytes}, max {q.max_prefix_bytes}"
            )
