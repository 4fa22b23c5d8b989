"""The waiting side of the scheduler: ready requests queued per fairness key, and the plan of which of
them join the running batch at the next step.

Plain Python (no torch). A request is ready once its prefix is pinned (server/prefetch.py); it then waits
in the queue of its fairness key (its tenant, else its task), in the order it became ready. Each plan
takes requests round-robin across those queues, so one key's flood cannot starve the others, within the
engine's free rows, its free K/V pages and the scheduler's token budget.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from server.errors import InvalidRequest, PrefixServerError
from server.request import Request

log = logging.getLogger(__name__)


class Capacity(Protocol):
    """What a plan reads of the engine: its rows and pages free now."""

    running: list[Request]
    num_free_rows: int  # rows that may still join: the row limit minus the running rows
    num_available_pages: int  # K/V pages free now, plus those held only by idle resident prefixes

    def pages_needed(self, request: Request, counted: set) -> int:
        """Pages admitting `request` (its prefix pinned) takes from `num_available_pages`: its own
        (prompt + max_new_tokens, reserved at admission), plus its prefix's unless a running row uses
        them or its `prefix_key` is in `counted` (the engine adds it: one plan counts a prefix once)."""
        ...


class WaitingQueues:
    """Ready requests, one queue per fairness key, and the round-robin order of the keys with waiters.
    `on_failed(request, error)`: a request taken out of its queue that will never run (larger than the
    whole K/V pool, or touched by a planning bug)."""

    def __init__(self, on_failed: Callable[[Request, Exception], None]) -> None:
        self.on_failed = on_failed
        self.queues: dict[str, collections.deque[Request]] = {}  # each in the order its requests got ready
        self.rotation: collections.deque[str] = collections.deque()  # round-robin order of keys with waiters

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def add(self, request: Request) -> None:
        """A ready request joins the end of its fairness queue."""
        key = request.fairness_key
        if key not in self.queues:
            self.queues[key] = collections.deque()
            self.rotation.append(key)
        self.queues[key].append(request)

    def remove(self, request: Request) -> bool:
        """Take a waiting request out of its queue (it was aborted). False: it was not waiting."""
        key = request.fairness_key
        queue = self.queues.get(key)
        if queue is None or request not in queue:
            return False
        queue.remove(request)
        if not queue:  # an empty queue left in the rotation would stop plan() (it reads queue[0])
            self._forget(key)
        return True

    def take_all(self) -> list[Request]:
        """Every waiting request, queue by queue; the queues are left empty (shutdown)."""
        requests = [request for queue in self.queues.values() for request in queue]
        self.queues.clear()
        self.rotation.clear()
        return requests

    def plan(self, engine: Capacity, budget: int) -> list[Request]:
        """Which ready requests join the running batch now: round-robin across the queues, within the
        engine's free rows and free K/V pages and `budget` tokens (prefix + prompt + max_new_tokens).

        A queue whose next request does not fit (pages or tokens) is blocked this round: that request
        keeps its place and other queues may go. Nothing reserves room for it, so while smaller requests
        of other queues keep taking what frees up it may wait long (its own queue behind it), bounded
        only by their load and the request timeout; it goes once the batch drains enough."""
        free_rows = engine.num_free_rows
        free_pages = engine.num_available_pages
        counted: set = set()  # prefixes whose pages this plan has counted (pages_needed adds to it)
        admitted: list[Request] = []
        blocked = 0  # queues whose next request does not fit this round
        key = None
        try:
            while free_rows and self.rotation and blocked < len(self.rotation):
                key = self.rotation[0]
                self.rotation.rotate(-1)
                queue = self.queues[key]
                if queue[0].budget_tokens > budget:
                    blocked += 1
                    continue
                seen = set(counted)  # what pages_needed adds counts only if this request goes
                pages = engine.pages_needed(queue[0], seen)
                if pages > free_pages and not engine.running and not admitted:
                    self._refuse(queue.popleft(), pages, free_pages)  # an empty engine: it never fits
                    if not queue:
                        self._forget(key)
                    continue
                if pages > free_pages:
                    blocked += 1
                    continue
                request = queue.popleft()
                admitted.append(request)
                free_rows -= 1
                free_pages -= pages
                counted = seen
                budget -= request.budget_tokens
                blocked = 0
                if not queue:
                    self._forget(key)
        except Exception as e:  # a bookkeeping bug: fail what it touched, repair the rotation, go on
            log.exception("planning failed at queue %r: failing the requests it touched", key)
            failure = PrefixServerError(
                f"the scheduler failed to plan this request ({type(e).__name__}); see the server log"
            )
            for request in [*admitted, *self.queues.pop(key, ())] if key is not None else admitted:
                self.on_failed(request, failure)
            self.queues = {k: q for k, q in self.queues.items() if q}
            self.rotation = collections.deque(k for k in self.rotation if k in self.queues)
            self.rotation.extend(k for k in self.queues if k not in self.rotation)
            return []
        return admitted

    def _refuse(self, request: Request, pages: int, num_pages: int) -> None:
        """A request larger than the whole K/V pool (with every row free) fails instead of waiting forever."""
        self.on_failed(
            request,
            InvalidRequest(
                f"request needs {pages} K/V pages (prefix + prompt + max_new_tokens), the engine has "
                f"{num_pages} in all; ask for fewer max_new_tokens"
            ),
        )

    def _forget(self, key: str) -> None:
        """A fairness key with no waiters leaves both the queues and the rotation."""
        self.queues.pop(key, None)
        with contextlib.suppress(ValueError):
            self.rotation.remove(key)
